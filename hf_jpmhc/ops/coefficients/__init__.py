"""Dynamic coefficients (SPEC §1): RMSNorm of the flattened streams, projection Φ, α, b and activations."""

from __future__ import annotations

import torch

from hf_jpmhc.models.stream_passes import dynamic_coefficients

from .._backend import device_guard, resolve_backend
from .naive import hc_coefficients_reference


def hc_coefficients(streams: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor,
                    split_sizes: tuple[int, int, int], pre_eps: float = 0.0, norm_eps: float = 1e-6,
                    kernel_backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """pre = σ(·) + eps (…, n), post = 2σ(·) (…, n), θ_res (…, r), all fp32, from streams (…, n, C).

    ``phi`` is (2n + r, nC), ``alpha`` (3,) = (α_pre, α_post, α_res), ``bias`` (2n + r,), split_sizes (n, n, r).
    """
    if resolve_backend(kernel_backend, streams) == "triton":
        from .fused import hc_coefficients_triton

        with device_guard(streams):
            return hc_coefficients_triton(streams, phi, alpha, bias, split_sizes, pre_eps, norm_eps)
    return dynamic_coefficients(streams, phi, alpha, bias, split_sizes, pre_eps, norm_eps)


__all__ = ["hc_coefficients", "hc_coefficients_reference"]
