"""Reference: the Cayley transform onto SO(n) (JPmHC, SPEC §2), plain torch."""

import torch


def cayley_reference(skew: torch.Tensor) -> torch.Tensor:
    """H = (I − A/2)⁻¹(I + A/2) for skew-symmetric A (…, n, n), solved exactly in float64, in A's dtype."""
    a = skew.double() / 2
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(eye - a, eye + a).to(skew.dtype)
