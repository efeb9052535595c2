"""Sinkhorn–Knopp onto the doubly-stochastic matrices (mHC, SPEC §2) with a Newton polish and the implicit
backward (JPmHC): the numerics of ``SinkhornMixer``.

P = SK(exp θ) for θ (…, n, n). The rounds alternate row and column normalisation; plain SK converges only
sublinearly near permutations (row error ≈ 1e-1 after 20 rounds at |θ| ≤ 10), so Newton steps on the row scalings
polish P to float64 rounding. The backward solves the adjoint of the fixed point (only P is saved).

The constants below are the single definition of these numerics: hf_jpmhc's C++ CPU kernels are compiled with
them (``hf_jpmhc/ops/cpu``), the Triton kernels take them as arguments.
"""

from __future__ import annotations

import torch

from .cayley import solve_small

# The row error from which the rounds hand over to the Newton polish, and the polish steps that then reach float64
# rounding (quadratic convergence: 2e-2 → 4e-4 → 2e-7 → 4e-14 → 2e-27).
NEWTON_BASIN, NEWTON_FROM_BASIN = 2e-2, 4
NEWTON_STEP_CLAMP = 2.0  # |f| of a row-scaling step e^f: damps the polish far from the solution (|θ| ~ 1e4)
SCALING_RIDGE = 1e-9  # ρ of the scaling Jacobian: keeps near-permutation P solvable (see ``scaling_solve``)
EARLY_EXIT_ULPS = 8  # converged: the row error within this many ulp of 1 in the working dtype
ROUND_CHECK_EVERY = 4  # the rounds test their early exit before the first round and every this many
NEWTON_CHECKPOINT = 2  # compiled polish: test convergence every this many steps (2 suffice near the identity)


@torch.compiler.assume_constant_result
def polish_constants() -> tuple[float, float]:
    """(NEWTON_STEP_CLAMP, SCALING_RIDGE), read by the polish as compile-time constants: under
    ``torch.compile(dynamic=True)`` dynamo lifts module-level floats to symbolic inputs, which the polish's
    ``torch.cond`` branches reject."""
    return NEWTON_STEP_CLAMP, SCALING_RIDGE


def early_exit_tolerance(tensor: torch.Tensor, compiled: bool = False) -> float | None:
    """The row error below which the rounds and Newton steps may stop (columns are exact after each column
    normalisation): ``EARLY_EXIT_ULPS`` ulp of 1 in the tensor's dtype (1e-6 in float32, 2e-15 in the float64
    polish), i.e. converged to float rounding. Only on CPU, where reading the residual on the host is a cheap sync,
    and not while autograd records the loop (the unrolled backward differentiates every step). In eager mode the
    loops test it with a Python ``break``; under ``torch.compile`` only where the caller can test it in the graph
    (``compiled=True``: the polish's ``torch.cond`` checkpoints) — otherwise None, never stop early."""
    recording = tensor.requires_grad and torch.is_grad_enabled()
    if tensor.device.type != "cpu" or recording or (torch.compiler.is_compiling() and not compiled):
        return None
    return EARLY_EXIT_ULPS * torch.finfo(tensor.dtype).eps


def sinkhorn_iterate(theta: torch.Tensor, iters: int, eps: float = 0.0, newton_steps: int = 0) -> torch.Tensor:
    """Sinkhorn–Knopp on exp(θ) (…, n, n): ``iters`` rounds of row then column normalisation.

    ``eps = 0`` runs its first round in the log domain (stable for any |θ|) and the others as float64 divisions
    (``_division_rounds``), then polishes with ``newton_steps`` Newton steps on the scalings (``sinkhorn_newton``).
    On CPU in eager mode the rounds stop early once the row error is within ``early_exit_tolerance``, and so does
    the polish: decoding calls this per token and site. With at least ``NEWTON_FROM_BASIN`` polish steps to follow,
    the rounds stop as soon as the row error is within ``NEWTON_BASIN``: near the identity the rounds shrink it by
    ≈ 3% each (1.3e-2 after the first, 7e-3 after 20, at θ = 4I + 0.05·N), while a Newton step, which costs about
    ten rounds, squares it — the same fixed point (to float64 rounding), ≈ 1.4× faster near the identity. Under
    ``torch.compile`` (CPU, autograd not recording) that handover is tested once, after the first round.
    ``eps > 0`` is the probability-domain form of transformers' ``DeepseekV4HyperConnection`` (softmax + eps, then
    ``P / (sum + eps)``), kept so that its checkpoints are reproduced exactly.
    """
    if eps == 0.0:
        tol, handover = early_exit_tolerance(theta), newton_steps >= NEWTON_FROM_BASIN
        log_p = torch.log_softmax(matrix_first(theta), dim=1)  # P as (n, n, …); rows sum to 1
        p = torch.log_softmax(log_p, dim=0).double().exp()  # columns sum to 1
        compiled_test = torch.compiler.is_compiling() and early_exit_tolerance(p, compiled=True) is not None
        if handover and iters > 1 and compiled_test:  # one test, through torch.cond, after the first round
            in_basin = (p.sum(1) - 1).abs().max() <= NEWTON_BASIN
            p = torch.cond(in_basin, torch.clone, lambda q: _division_rounds(q, iters - 1, None), (p,))
        else:
            p = _division_rounds(p, iters - 1, NEWTON_BASIN if tol is not None and handover else tol)
        return matrix_last(sinkhorn_newton(p, newton_steps), theta.dtype)
    p = torch.softmax(theta, dim=-1) + eps
    p = p / (p.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        p = p / (p.sum(-1, keepdim=True) + eps)
        p = p / (p.sum(-2, keepdim=True) + eps)
    return p


def _division_rounds(p: torch.Tensor, rounds: int, tol: float | None) -> torch.Tensor:
    """``rounds`` Sinkhorn rounds on P (n, n, …) (``matrix_first``) after the log-domain first one, stopping once the
    row error is within ``tol`` (tested before the first and every ``ROUND_CHECK_EVERY``; None: never).

    After the first round every row and column keeps an entry ≥ 1/n² (a normalisation divides by a sum ≤ n), so
    these run as plain divisions in float64 (no exp/log per round); entries below e^-700 of their row's largest
    flush to zero (the log-domain rounds agreed to 1e-6 at |θ| ≤ 10)."""
    for i in range(rounds):
        if tol is not None and i % ROUND_CHECK_EVERY == 0 and (p.sum(1) - 1).abs().max() <= tol:
            break
        p = p / p.sum(1, keepdim=True)
        p = p / p.sum(0, keepdim=True)
    return p


def matrix_first(x: torch.Tensor) -> torch.Tensor:
    """(…, n, n) → (n, n, …), contiguous: the tokens become the innermost axis, so the row and column sums of
    the small matrices are vectorised loops over tokens (5× faster on CPU than summing 4 contiguous floats)."""
    return x.movedim((-2, -1), (0, 1)).contiguous()


def matrix_last(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of ``matrix_first``, cast to ``dtype`` in the same copy."""
    return x.movedim((0, 1), (-2, -1)).to(dtype, memory_format=torch.contiguous_format)


def sinkhorn_newton(p: torch.Tensor, steps: int) -> torch.Tensor:
    """Newton's method for the scalings of P (n, n, …) (``matrix_first`` layout): diag(e^f) P diag(e^g) with
    unit row and column sums, in float64.

    The columns are normalised first, in float64 (the rounds may have stopped at float32 rounding). Each step
    then solves the scaling Jacobian for the row scaling f (``scaling_solve`` with ∂col = 0: the columns are
    exact), rescales the rows by e^f — clipped to ±``NEWTON_STEP_CLAMP`` — and normalises the columns exactly,
    which is the column half of the Newton step (the column scaling e^g would cancel in that normalisation, so it
    is never applied). Only the n row scalings see an exp, P never leaves the probability domain.

    On CPU the polish stops once the row error is within ``early_exit_tolerance`` (float64 rounding: a float32
    result is then doubly stochastic to its own rounding, which keeps converted models' equal streams equal
    over many sites): after any step in eager mode, and under ``torch.compile`` every ``NEWTON_CHECKPOINT``
    steps, through ``torch.cond`` — compiled decoding would otherwise run all ``steps`` for every token and
    site, each step a handful of tiny buffers.
    """
    p = p.double()
    return _newton_steps(p / p.sum(0, keepdim=True), steps) if steps else p


def _newton_steps(p: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` polish steps on P (float64, unit column sums), with the early exit of ``sinkhorn_newton``."""
    if torch.compiler.is_compiling() and steps > NEWTON_CHECKPOINT:
        tol = early_exit_tolerance(p, compiled=True)
        if tol is not None:
            p = _newton_steps(p, NEWTON_CHECKPOINT)
            converged = (p.sum(1) - 1).abs().max() <= tol
            rest = lambda q: _newton_steps(q, steps - NEWTON_CHECKPOINT)  # noqa: E731
            return torch.cond(converged, torch.clone, rest, (p,))
    tol = early_exit_tolerance(p)
    for _ in range(steps):
        row = p.sum(1)
        if tol is not None and (row - 1).abs().max() <= tol:
            break
        f, _ = scaling_solve(p, row, 1 - row)
        clamp = polish_constants()[0]
        p = p * f.clamp(-clamp, clamp).exp().unsqueeze(1)
        p = p / p.sum(0, keepdim=True)
    return p


def scaling_solve(p, row, rhs_row, rhs_col=None):
    """(f, g) solving the scaling Jacobian J (f; g) = (rhs_row; rhs_col) for P (n, n, …) (``matrix_first``) with
    unit column sums, J = [[diag(row), P], [Pᵀ, I]] + ρI — the Jacobian of the scaling equations row = P1,
    col = Pᵀ1 at col = 1, and at the fixed point (row = 1) the adjoint system of the implicit backward —
    through its n×n Schur complement (d = 1 + ρ):

        S f = rhs_row − P rhs_col / d,   S = diag(row) + ρ − P Pᵀ / d + 11ᵀ,   g = (rhs_col − Pᵀ f) / d.

    rhs_col = None means 0, and then g is not formed (None). J is singular along (1, −1) (shifting f by t and
    g by −t leaves P unchanged), to which both right-hand sides here are orthogonal; the 11ᵀ term picks the
    solution with Σ f = 0, and the ridge ρ = ``SCALING_RIDGE`` keeps near-permutation P, whose extra null
    directions meet only zero entries of P, solvable. The products are broadcast sums over the small axes,
    vectorised over the tokens.
    """
    n, ridge = p.shape[0], polish_constants()[1]
    d = 1 + ridge
    eye = torch.eye(n, dtype=p.dtype, device=p.device).view(n, n, *[1] * (p.dim() - 2))
    schur = eye * (row + ridge).unsqueeze(1) - (p.unsqueeze(1) * p.unsqueeze(0)).sum(2) / d + 1.0
    rhs = rhs_row if rhs_col is None else rhs_row - (p * rhs_col.unsqueeze(0)).sum(1) / d
    f = solve_small(schur.movedim((0, 1), (-2, -1)), rhs.movedim(0, -1).unsqueeze(-1)).squeeze(-1).movedim(-1, 0)
    return f, None if rhs_col is None else (rhs_col - (p * f.unsqueeze(1)).sum(0)) / d


class SinkhornImplicitFunction(torch.autograd.Function):
    """P = SK(exp θ) with the implicit-function backward (JPmHC): only P is saved, whatever ``iters``.

    At the fixed point P = exp(θ + α1ᵀ + 1βᵀ) with P1 = 1, Pᵀ1 = 1. Differentiating the constraints gives,
    for the upstream gradient G,

        [[I, P], [Pᵀ, I]] [a; b] = [(G⊙P)1; (G⊙P)ᵀ1],      ∂L/∂θ = P ⊙ (G − a1ᵀ − 1bᵀ).

    The system (``scaling_solve``) is singular along (1, −1), to which the right-hand side is orthogonal. Exact
    for the converged map, which the Newton polish in the forward provides.
    """

    @staticmethod
    def forward(ctx, theta: torch.Tensor, iters: int, eps: float, newton_steps: int) -> torch.Tensor:
        p = sinkhorn_iterate(theta, iters, eps, newton_steps)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad_p: torch.Tensor):
        (p,) = ctx.saved_tensors
        return sinkhorn_implicit_grad(p, grad_p), None, None, None


def sinkhorn_implicit_grad(p: torch.Tensor, grad_p: torch.Tensor) -> torch.Tensor:
    """∂L/∂θ of the Sinkhorn fixed point from P and G = ∂L/∂P (see ``SinkhornImplicitFunction``)."""
    p64 = matrix_first(p).double()
    g64 = matrix_first(grad_p).double()
    gp = g64 * p64
    gp_col = gp.sum(0)
    a, b = scaling_solve(p64, torch.ones_like(gp_col), gp.sum(1), gp_col)
    return matrix_last(p64 * (g64 - a.unsqueeze(1) - b.unsqueeze(0)), p.dtype)
