"""Reference: Sinkhorn–Knopp onto the doubly-stochastic matrices (mHC, SPEC §2), plain torch.

Log-domain rounds (stable for any |θ|), then Newton steps on the row scalings in float64 until the row sums are 1
to float64 rounding (plain SK is only sublinear near permutations). Differentiable by autograd through every step,
which at the fixed point equals the implicit backward of SPEC §2.
"""

import torch


def sinkhorn_reference(theta: torch.Tensor, iters: int = 20, newton_steps: int = 8) -> torch.Tensor:
    """P = SK(exp θ) for θ (…, n, n): ``iters`` row/column rounds, then ``newton_steps`` Newton steps."""
    log_p = theta.double()
    for _ in range(iters):
        log_p = log_p - log_p.logsumexp(-1, keepdim=True)  # rows
        log_p = log_p - log_p.logsumexp(-2, keepdim=True)  # columns
    p = log_p.exp()
    n = p.shape[-1]
    for _ in range(newton_steps):  # row scalings f: (diag(r) − P Pᵀ + 11ᵀ) f = 1 − r keeps the columns exact
        rows = p.sum(-1)
        jacobian = torch.diag_embed(rows) - p @ p.mT + torch.ones(n, n, dtype=p.dtype, device=p.device)
        f = torch.linalg.solve(jacobian, (1 - rows).unsqueeze(-1))
        p = p * f.exp()
        p = p / p.sum(-2, keepdim=True)
    return p.to(theta.dtype)
