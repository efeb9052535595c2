"""Reference: u = Σᵢ wᵢ Xᵢ (SPEC §1), plain float32 torch."""

import torch


def collapse_streams_reference(streams: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """u = Σᵢ wᵢ Xᵢ: streams (…, n, C), weights (…, n) → (…, C), computed in float32, in the streams' dtype."""
    return torch.einsum("...n,...nc->...c", weights.float(), streams.float()).to(streams.dtype)
