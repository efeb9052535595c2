"""The Cayley transform onto SO(m) (JPmHC, SPEC §2): the numerics of the stiefel, spectral and Grassmann mixers.

Cayley(A) = (I − A/2)⁻¹(I + A/2) is exactly orthogonal with det +1 for skew-symmetric A. A is built from free
logits θ over the strict upper triangle (``skew_pairs``); ``cayley`` solves exactly, ``CayleyIterativeFunction``
runs the matmul fixed point with an exact O(m²)-memory backward.
"""

from __future__ import annotations

import torch


def skew_pairs(m: int) -> torch.Tensor:
    """The (i, j) of the logits of an m×m skew-symmetric matrix: the strict upper triangle in row-major order,
    (m(m−1)/2, 2) int64. The one definition of that order (the C++ kernels take this table)."""
    return torch.triu_indices(m, m, offset=1).T.contiguous()


def skew_basis(m: int) -> torch.Tensor:
    """The basis E_ij − E_ji of the m×m skew-symmetric matrices over ``skew_pairs(m)``, flattened: (m(m−1)/2, m·m)."""
    pairs = skew_pairs(m)
    basis = torch.zeros(pairs.shape[0], m, m)
    basis[torch.arange(pairs.shape[0]), pairs[:, 0], pairs[:, 1]] = 1.0
    return (basis - basis.transpose(-1, -2)).flatten(1)


def skew_from_logits(theta: torch.Tensor, basis: torch.Tensor, m: int) -> torch.Tensor:
    """Skew-symmetric A = Σ_k θ_k (E_ij − E_ji)_k (…, m, m) from θ (…, k) and ``skew_basis(m)``: one matmul,
    exact (every entry is a single ±θ_k)."""
    return (theta @ basis.to(theta.dtype)).unflatten(-1, (m, m))


def solve_small(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a⁻¹ b for batches of small systems (…, m, m), (…, m, k) whose symmetric part is positive definite —
    the systems here: I − A/2 with A skew (symmetric part I) and the Schur complement of the Sinkhorn
    scaling Jacobian (symmetric positive definite) — so that elimination needs no pivoting.

    Eager: LAPACK's ``solve_ex`` (never singular here, so no error check and no host sync). Under
    ``torch.compile``: Gauss–Jordan elimination unrolled over the m pivots, elementwise ops that inductor
    fuses into the surrounding kernel instead of one library call per solve — the Sinkhorn polish under
    compiled decoding would otherwise be eight calls per site and token.
    """
    if not torch.compiler.is_compiling():
        return torch.linalg.solve_ex(a, b).result
    m = a.shape[-1]
    a_rows, b_rows = list(a.unbind(-2)), list(b.unbind(-2))  # the rows of [a | b], kept apart (no copy into one)
    for k in range(m):
        pivot = a_rows[k][..., k : k + 1]
        a_rows[k], b_rows[k] = a_rows[k] / pivot, b_rows[k] / pivot
        for i in range(m):
            if i != k:
                factor = a_rows[i][..., k : k + 1]
                a_rows[i], b_rows[i] = a_rows[i] - factor * a_rows[k], b_rows[i] - factor * b_rows[k]
    return torch.stack(b_rows, dim=-2)


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """Cayley(A) = (I − A/2)⁻¹(I + A/2): exactly orthogonal with det +1 for skew-symmetric A.

    The solve runs in float64: I − A/2 has condition number ≈ ‖A‖/2, so at |θ| ~ 1e4 a float32 solve
    would lose orthogonality (~1e-3); the matrices are at most a few streams wide, so this is cheap.
    """
    a = skew.double() / 2
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return solve_small(eye - a, eye + a).to(skew.dtype)  # I − A/2 is never singular (eigenvalues 1 ± iλ/2)


class CayleyIterativeFunction(torch.autograd.Function):
    """Cayley(A) by the fixed point Y ← I + (A/2)(I + Y) (matmuls only), with the exact backward.

    Converges when ‖A/2‖₂ < 1, geometrically at that rate. From (I − A/2)H = I + A/2:
    dH = (I − A/2)⁻¹ (dA/2)(I + H), and (I − A/2)⁻¹ = (I + H)/2, so ∂L/∂A = ¼ (I + H)ᵀ G (I + H)ᵀ.
    Only H is saved.
    """

    @staticmethod
    def forward(ctx, skew: torch.Tensor, iters: int) -> torch.Tensor:
        half = skew / 2
        eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device)
        h = eye + 2 * half  # the first iterate from Y = I
        for _ in range(iters - 1):
            h = eye + half @ (eye + h)
        ctx.save_for_backward(h)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        (h,) = ctx.saved_tensors
        eye_plus_h_t = (torch.eye(h.shape[-1], dtype=h.dtype, device=h.device) + h).transpose(-1, -2)
        return eye_plus_h_t @ grad_h @ eye_plus_h_t / 4, None
