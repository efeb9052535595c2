"""Stream update X' = Hᵀ X + post ⊗ f (SPEC §1): the residual mix plus the branch write-back."""

from __future__ import annotations

import torch

from hf_jpmhc.models.stream_passes import StreamPasses, StreamUpdate

from .._backend import device_guard, resolve_backend
from .naive import update_streams_reference


def update_streams(streams: torch.Tensor, mixer: torch.Tensor, post: torch.Tensor, branch: torch.Tensor,
                   kernel_backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """X'_t = Σ_s H[s, t] X_s + post_t f: streams (…, n, C), mixer (…, n, n), post (…, n), branch (…, C)."""
    if resolve_backend(kernel_backend, streams) == "triton":
        from .fused import update_streams_triton

        with device_guard(streams):
            return update_streams_triton(streams, mixer, post, branch)
    return StreamUpdate.apply(streams, mixer, post, branch, StreamPasses)


__all__ = ["update_streams", "update_streams_reference"]
