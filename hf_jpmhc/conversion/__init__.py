"""Convert pretrained single-stream checkpoints into function-preserving n-stream JPmHC models (SPEC §3)."""

from .deepseek_v4 import (
    hyper_connection_fields_from_deepseek_v4,
    hyper_connection_from_deepseek_v4,
    stream_collapse_from_deepseek_v4,
)
from .llama import convert_llama
from .vit import convert_vit

__all__ = [
    "convert_llama",
    "convert_vit",
    "hyper_connection_fields_from_deepseek_v4",
    "hyper_connection_from_deepseek_v4",
    "stream_collapse_from_deepseek_v4",
]
