"""Collapse u = Σ_i w_i X_i (SPEC §1): the branch input and the final stream head."""

from __future__ import annotations

import torch

from hf_jpmhc.models import stream_passes

from .._backend import device_guard, resolve_backend
from .naive import collapse_streams_reference


def collapse_streams(streams: torch.Tensor, weights: torch.Tensor, kernel_backend: str = "auto") -> torch.Tensor:
    """u = Σ_i w_i X_i: streams (…, n, C), weights (…, n) float32 → (…, C) in the streams' dtype."""
    if resolve_backend(kernel_backend, streams) == "triton":
        from .fused import collapse_streams_triton

        with device_guard(streams):
            return collapse_streams_triton(streams, weights)
    return stream_passes.collapse_streams(streams, weights)


__all__ = ["collapse_streams", "collapse_streams_reference"]
