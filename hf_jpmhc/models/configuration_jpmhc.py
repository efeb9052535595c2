"""``JPmHCConfig``: a Llama config plus the shared hyper-connection fields."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from .configuration_hyper_connection import HyperConnectionConfig


@strict
class JPmHCConfig(LlamaConfig, HyperConnectionConfig):
    r"""Configuration of a hyper-connected Llama-style decoder (``model_type="jpmhc"``).

    Every ``LlamaConfig`` field (vocab, hidden, intermediate, layers, heads, KV heads for GQA,
    ``rope_parameters``, ``rms_norm_eps``, ``tie_word_embeddings``, ``attention_bias``, ``mlp_bias``,
    ``max_position_embeddings``) keeps its meaning; the n-stream residual is described by the fields of
    ``HyperConnectionConfig`` (``num_streams``, ``mixer``, …). Invalid values raise ``ValueError`` here.

    ```python
    >>> from hf_jpmhc import JPmHCConfig, JPmHCForCausalLM
    >>> config = JPmHCConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_streams=4, mixer="stiefel")
    >>> model = JPmHCForCausalLM(config)
    ```
    """

    model_type = "jpmhc"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_hyper_connection()


__all__ = ["JPmHCConfig"]
