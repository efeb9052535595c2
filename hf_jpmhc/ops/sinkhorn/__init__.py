"""Sinkhorn projection onto the doubly-stochastic matrices (mHC) with the implicit backward (JPmHC, SPEC §2)."""

from __future__ import annotations

import torch

from hf_jpmhc.models.sinkhorn import SinkhornImplicitFunction

from .._backend import device_guard, resolve_backend
from .naive import sinkhorn_reference


def sinkhorn(
    theta: torch.Tensor, iters: int = 20, newton_steps: int = 8, kernel_backend: str = "auto"
) -> torch.Tensor:
    """P = SK(exp θ) for θ (…, n, n), log-domain rounds + Newton polish; backward by the implicit function theorem."""
    if resolve_backend(kernel_backend, theta) == "triton":
        from .fused import sinkhorn_triton

        with device_guard(theta):
            return sinkhorn_triton(theta, iters, newton_steps)
    return SinkhornImplicitFunction.apply(theta, iters, 0.0, newton_steps)


__all__ = ["sinkhorn", "sinkhorn_reference"]
