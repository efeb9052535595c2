"""Llama checkpoint → n-stream ``JPmHCForCausalLM``, function-preserving (SPEC §3).

``JPmHCForCausalLM`` reuses transformers' ``LlamaAttention``/``LlamaMLP``/``LlamaRMSNorm`` under the same
parameter names, so a conversion is a config translation plus a weight *move*; the new hyper-connection
parameters start at the function-preserving initialisation (Φ = 0, post = 1, Σ pre = 1, Hᵀ1 = 1), so right
after conversion the n streams all equal the source's residual and the logits are the source's.

Architectures that compute exactly the Llama function are accepted when every config field maps:

* ``llama``   — everything (GQA, tied embeddings, ``rope_parameters`` incl. scaling, attention/MLP bias);
* ``mistral`` — without sliding-window attention (``sliding_window=None``);
* ``qwen2``   — without sliding-window layers; its q/k/v bias maps to ``attention_bias=True``, whose extra
  o_proj bias is set to zero (adding 0 is exact, and the bias becomes trainable).

Anything else is refused with a ValueError that names what does not map.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..models.configuration_jpmhc import JPmHCConfig
from ..models.hyper_connection import HYPER_CONNECTION_MODULES
from ..models.modeling_jpmhc import JPmHCForCausalLM
from .common import build_empty, hyper_connection_fields, materialize_new_parameters, move_weights, progress

# Parameter-name fragments of the hyper-connections, which the source does not have.
# Bookkeeping fields of every config: they name or describe the checkpoint, not the function.
BOOKKEEPING_FIELDS = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")


@dataclass(frozen=True)
class Requirement:
    """A source config field that must satisfy ``holds`` for the Llama computation to be exact."""

    holds: Callable[[object], bool]
    allowed: str


@dataclass(frozen=True)
class SourceArchitecture:
    """How a Llama-compatible architecture maps onto ``JPmHCConfig``.

    requirements: fields that must hold a value for the map to be exact (else ValueError).
    inert:        fields that have no effect once the requirements hold.
    implied:      JPmHCConfig fields the architecture fixes (Qwen2's q/k/v bias → attention_bias=True).
    zero_bias:    per-layer Linear modules whose bias the target has and the source lacks; set to 0.
    """

    model_class: str
    requirements: dict[str, Requirement] = field(default_factory=dict)
    inert: tuple[str, ...] = ()
    implied: dict[str, object] = field(default_factory=dict)
    zero_bias: tuple[str, ...] = ()


NO_SLIDING_WINDOW = Requirement(lambda value: value is None, "None (sliding-window attention does not map)")
ALL_FULL_ATTENTION = Requirement(
    lambda value: value is None or all(kind == "full_attention" for kind in value),
    "only 'full_attention' layers (sliding-window attention does not map)",
)

# Quantised weights live in other module types (and a GGUF dequantises on load): convert a float checkpoint.
COMMON_REQUIREMENTS = {"quantization_config": Requirement(lambda value: value is None, "None (dequantise first)")}

ARCHITECTURES = {
    "llama": SourceArchitecture("LlamaForCausalLM"),
    "mistral": SourceArchitecture("MistralForCausalLM", requirements={"sliding_window": NO_SLIDING_WINDOW}),
    "qwen2": SourceArchitecture(
        "Qwen2ForCausalLM",
        requirements={"layer_types": ALL_FULL_ATTENTION},
        inert=("use_sliding_window", "sliding_window", "max_window_layers"),
        implied={"attention_bias": True},
        zero_bias=("self_attn.o_proj",),
    ),
}


def jpmhc_config_from(source_config, num_streams: int, mixer: str, mixer_options: dict) -> JPmHCConfig:
    """The ``JPmHCConfig`` computing the same function as ``source_config`` with n streams.

    Raises ValueError naming every source field that has no exact counterpart.
    """
    model_type = getattr(source_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type={model_type!r} cannot be converted: supported source architectures are "
            f"{', '.join(ARCHITECTURES)} (Llama-compatible decoders)"
        )
    architecture = ARCHITECTURES[model_type]
    requirements = {**COMMON_REQUIREMENTS, **architecture.requirements}
    source = source_config.to_dict()
    problems = [
        f"{name}={source[name]!r} (allowed: {requirement.allowed})"
        for name, requirement in requirements.items()
        if name in source and not requirement.holds(source[name])
    ]
    # Fields the source architecture declares must exist in JPmHCConfig; undeclared extras (e.g. unk_token_id)
    # are ignored by the source model as well, and travel along as plain attributes.
    declared, target_fields = set(type(source_config)().to_dict()), set(JPmHCConfig().to_dict())
    skipped = {*BOOKKEEPING_FIELDS, *requirements, *architecture.inert}
    unmapped = [name for name in source if name in declared and name not in target_fields and name not in skipped]
    problems += [f"{name}={source[name]!r} (no JPmHC counterpart)" for name in unmapped]
    if problems:
        raise ValueError(f"{model_type} checkpoint does not map onto JPmHC: {'; '.join(problems)}")
    kwargs = {name: value for name, value in source.items() if name not in skipped}

    config = JPmHCConfig(**kwargs, **architecture.implied, **hyper_connection_fields(num_streams, mixer, mixer_options))
    converted = config.to_dict()
    changed = [f"{name}: {source[name]!r} → {converted[name]!r}" for name in kwargs if converted[name] != source[name]]
    if changed:
        raise ValueError(f"{model_type} checkpoint does not map onto JPmHC, these fields change: {'; '.join(changed)}")
    config._attn_implementation = source_config._attn_implementation
    return config


def load_source(model_or_path: nn.Module | str | Path, num_streams: int, mixer: str, mixer_options: dict):
    """(source model, target config); a path or Hub name is checked, and mapped from its config, before the
    weights load, strictly (``hf_jpmhc.loading``: weights that do not match the config are refused)."""
    if isinstance(model_or_path, (str, Path)):
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..loading import check_checkpoint, load_pretrained

        check_checkpoint(model_or_path)
        config = jpmhc_config_from(AutoConfig.from_pretrained(model_or_path), num_streams, mixer, mixer_options)
        return load_pretrained(AutoModelForCausalLM, model_or_path), config
    if not isinstance(model_or_path, nn.Module) or not hasattr(model_or_path, "config"):
        raise ValueError(f"model_or_path must be a causal LM, a directory or a Hub name, got {type(model_or_path).__name__}")
    return model_or_path, jpmhc_config_from(model_or_path.config, num_streams, mixer, mixer_options)


@torch.no_grad()
def convert_llama(model_or_path: nn.Module | str | Path, num_streams: int = 4, mixer: str = "stiefel", **mixer_options) -> JPmHCForCausalLM:
    """Convert a ``LlamaForCausalLM`` (or a Mistral / Qwen2 model that maps exactly) to an n-stream
    ``JPmHCForCausalLM`` computing the same function (SPEC §3).

    ``model_or_path`` is a model instance, a local directory or a Hub name. ``mixer_options`` are
    ``HyperConnectionConfig`` fields (``sinkhorn_iters``, ``grassmann_rank``, ``dynamic``, ...).

    The weights are moved, not copied: a converted *instance* shares its tensors with the source model
    (deep-copy the source first if both must be trained independently). Raises ValueError when the
    source does not map exactly.

    ```python
    >>> model = convert_llama("HuggingFaceTB/SmolLM2-135M-Instruct", num_streams=4, mixer="sinkhorn")
    ```
    """
    source, config = load_source(model_or_path, num_streams, mixer, mixer_options)
    architecture = ARCHITECTURES[source.config.model_type]
    if type(source).__name__ != architecture.model_class:
        raise ValueError(f"expected a {architecture.model_class} (a causal LM with its head), got {type(source).__name__}")
    device = source.model.embed_tokens.weight.device

    target = build_empty(JPmHCForCausalLM, config)
    move_weights(target.model.embed_tokens, source.model.embed_tokens)
    move_weights(target.model.norm, source.model.norm)
    if not config.tie_word_embeddings:
        move_weights(target.lm_head, source.lm_head)
    layers = zip(target.model.layers, source.model.layers, strict=True)
    for target_layer, source_layer in progress(layers, desc=f"converting to {num_streams} streams", total=len(source.model.layers)):
        move_weights(target_layer, source_layer, new=(*HYPER_CONNECTION_MODULES, *(f"{m}.bias" for m in architecture.zero_bias)))
        for name in architecture.zero_bias:
            linear = target_layer.get_submodule(name)
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=device))
    if config.tie_word_embeddings:
        target.tie_weights()
    materialize_new_parameters(target, device=device)
    target.to(device)  # the buffers built in __init__ (rotary, mixer bases); moved parameters stay where they are

    target.generation_config = copy.deepcopy(source.generation_config)
    return target.train(source.training)


__all__ = ["ARCHITECTURES", "convert_llama", "jpmhc_config_from"]
