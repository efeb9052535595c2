"""``JPmHCViTConfig``: a ViT config plus the shared hyper-connection fields."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import ViTConfig

from .configuration_hyper_connection import HyperConnectionConfig


@strict
class JPmHCViTConfig(ViTConfig, HyperConnectionConfig):
    r"""Configuration of a hyper-connected Vision Transformer encoder (``model_type="jpmhc_vit"``).

    Every ``ViTConfig`` field (``image_size``, ``patch_size``, ``num_channels``, ``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``, ``qkv_bias``, ``layer_norm_eps``,
    ``hidden_dropout_prob``, ``attention_probs_dropout_prob``, ``id2label``/``label2id``) keeps its meaning;
    the n-stream residual is described by the fields of ``HyperConnectionConfig`` (``num_streams``,
    ``mixer``, …). The hyper-connections normalise with ``layer_norm_eps``. Invalid values raise ``ValueError``.

    ```python
    >>> from hf_jpmhc import JPmHCViTConfig, JPmHCViTForImageClassification
    >>> config = JPmHCViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=4,
    ...                         num_attention_heads=4, intermediate_size=128, num_labels=10, mixer="stiefel")
    >>> model = JPmHCViTForImageClassification(config)
    ```
    """

    model_type = "jpmhc_vit"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_hyper_connection()


__all__ = ["JPmHCViTConfig"]
