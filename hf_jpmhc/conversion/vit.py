"""ViT checkpoint → n-stream JPmHC-ViT, function-preserving (SPEC §3).

``JPmHCViTModel`` reuses transformers' ViT embeddings, attention, MLP, layer norms and pooler under ViT's
parameter names, so a conversion is a config translation plus a weight *move* (``conversion.common``); the
new hyper-connection parameters (``*.attn_hc.*``, ``*.mlp_hc.*``, ``*.stream_collapse.*``) start at the
function-preserving initialisation, so right after conversion the logits are the source's, for every mixer.

    ViTForImageClassification  →  JPmHCViTForImageClassification
    ViTModel                   →  JPmHCViTModel (keeping its pooler and mask token, if any)
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from ..models.configuration_jpmhc_vit import JPmHCViTConfig
from ..models.hyper_connection import HYPER_CONNECTION_MODULES
from ..models.modeling_jpmhc_vit import JPmHCViTForImageClassification, JPmHCViTModel
from .common import build_empty, hyper_connection_fields, materialize_new_parameters, move_weights, progress

# Parameter-name fragments of the hyper-connections, which the source does not have.
# Bookkeeping fields of every config: they name or describe the checkpoint, not the function.
BOOKKEEPING_FIELDS = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")


def jpmhc_vit_config_from(source_config: ViTConfig, num_streams: int, mixer: str, mixer_options: dict) -> JPmHCViTConfig:
    """The ``JPmHCViTConfig`` with every ViT field of ``source_config`` and the given hyper-connection fields."""
    if getattr(source_config, "model_type", None) != "vit":
        raise ValueError(
            f"model_type={getattr(source_config, 'model_type', None)!r} cannot be converted: convert_vit needs a "
            "'vit' checkpoint (ViTForImageClassification or ViTModel)"
        )
    source = {k: v for k, v in source_config.to_dict().items() if k not in BOOKKEEPING_FIELDS}
    config = JPmHCViTConfig(**source, **hyper_connection_fields(num_streams, mixer, mixer_options))
    config._attn_implementation = source_config._attn_implementation
    return config


def load_source(model_or_path: nn.Module | str | Path) -> ViTForImageClassification | ViTModel:
    """A ViT model instance, or the checkpoint at a path / Hub name loaded, strictly (``hf_jpmhc.loading``), as
    the class its config names."""
    if isinstance(model_or_path, (str, Path)):
        from ..loading import check_checkpoint, load_pretrained

        check_checkpoint(model_or_path)
        config = ViTConfig.from_pretrained(model_or_path)
        jpmhc_vit_config_from(config, 1, "identity", {})  # refuse a non-ViT checkpoint before loading weights
        with_head = "ViTForImageClassification" in (config.architectures or [])
        return load_pretrained(ViTForImageClassification if with_head else ViTModel, model_or_path, config=config)
    if not isinstance(model_or_path, (ViTForImageClassification, ViTModel)):
        raise ValueError(
            "model_or_path must be a ViTForImageClassification, a ViTModel, a directory or a Hub name, "
            f"got {type(model_or_path).__name__}"
        )
    return model_or_path


@torch.no_grad()
def convert_vit(
    model_or_path: ViTForImageClassification | ViTModel | str | Path,
    num_streams: int = 4,
    mixer: str = "stiefel",
    **mixer_options,
) -> JPmHCViTForImageClassification | JPmHCViTModel:
    """Convert a ``ViTForImageClassification`` (or ``ViTModel``) to an n-stream JPmHC-ViT computing the same
    function (SPEC §3).

    ``model_or_path`` is a model instance, a local directory or a Hub name. ``mixer_options`` are
    ``HyperConnectionConfig`` fields (``sinkhorn_iters``, ``grassmann_rank``, ``dynamic``, ...). The weights
    are moved, not copied: a converted *instance* shares its tensors with the source (deep-copy the source
    first if both must be trained independently); the hyper-connection parameters are float32.

    ```python
    >>> model = convert_vit("google/vit-base-patch16-224", num_streams=4, mixer="sinkhorn")
    ```
    """
    config = None
    if not isinstance(model_or_path, (str, Path)):  # validate the options before touching anything
        config = jpmhc_vit_config_from(getattr(model_or_path, "config", None), num_streams, mixer, mixer_options)
    source = load_source(model_or_path)
    config = config or jpmhc_vit_config_from(source.config, num_streams, mixer, mixer_options)
    device = next(source.parameters()).device

    if isinstance(source, ViTForImageClassification):
        target = build_empty(JPmHCViTForImageClassification, config)
        move_weights(target.classifier, source.classifier)
        target_vit, source_vit = target.vit, source.vit
    else:
        with_pooler, with_mask_token = source.pooler is not None, source.embeddings.mask_token is not None
        target = build_empty(partial(JPmHCViTModel, add_pooling_layer=with_pooler, use_mask_token=with_mask_token), config)
        target_vit, source_vit = target, source
    for name in ("embeddings", "layernorm", "pooler"):
        if getattr(source_vit, name) is not None:
            move_weights(getattr(target_vit, name), getattr(source_vit, name))
    layers = zip(target_vit.layers, source_vit.layers, strict=True)
    for target_layer, source_layer in progress(layers, desc=f"converting to {num_streams} streams", total=len(source_vit.layers)):
        move_weights(target_layer, source_layer, new=HYPER_CONNECTION_MODULES)
    materialize_new_parameters(target, device=device)
    return target.train(source.training)


__all__ = ["convert_vit", "jpmhc_vit_config_from"]
