"""Reference: X' = Hᵀ X + post ⊗ f (SPEC §1, H applied transposed), plain float32 torch."""

import torch


def update_streams_reference(streams, mixer, post, branch) -> torch.Tensor:
    """X'_t = Σ_s H[s, t] X_s + post_t f: streams (…, n, C), mixer (…, n, n), post (…, n), branch (…, C)."""
    mixed = torch.einsum("...st,...sc->...tc", mixer.float(), streams.float())  # Hᵀ X
    return (mixed + post.float().unsqueeze(-1) * branch.float().unsqueeze(-2)).to(streams.dtype)
