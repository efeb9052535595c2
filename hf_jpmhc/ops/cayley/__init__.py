"""Iterative Cayley transform Cayley(A) = (I − A/2)⁻¹(I + A/2) for the Stiefel mixer (JPmHC, SPEC §2)."""

from __future__ import annotations

import torch

from hf_jpmhc.models.cayley import CayleyIterativeFunction

from .._backend import device_guard, resolve_backend
from .naive import cayley_reference


def cayley(skew: torch.Tensor, iters: int = 12, kernel_backend: str = "auto") -> torch.Tensor:
    """H = Cayley(A) for skew A (…, n, n) with ‖A/2‖₂ < 1, by ``iters`` fixed-point steps; saves only H."""
    if resolve_backend(kernel_backend, skew) == "triton":
        from .fused import cayley_triton

        with device_guard(skew):
            return cayley_triton(skew, iters)
    return CayleyIterativeFunction.apply(skew, iters)


__all__ = ["cayley", "cayley_reference"]
