"""Convert pretrained single-stream checkpoints into function-preserving n-stream JPmHC models (SPEC §3)."""

from .llama import convert_llama

__all__ = ["convert_llama"]
