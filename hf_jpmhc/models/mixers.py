"""The residual mixers: maps from unconstrained logits θ to an n×n matrix H on a manifold (SPEC §2).

Every mixer is a parameter-free ``nn.Module`` (its constant bases live in non-persistent buffers, so they
follow ``.to(device)``) with

* ``num_logits``    — r, the number of free logits for its ``n``;
* ``forward(θ)``    — θ ``[..., r]`` → H ``[..., n, n]``, computed in float32 (or float64 when θ is);
* ``init_logits()`` — the logits whose H is the identity, or the closest the manifold allows; the
  hyper-connection starts its static bias there.

The hyper-connection applies H transposed: ``X' = Hᵀ X + post ⊗ f`` (see ``hyper_connection.py``).

Notation: n streams; J = 11ᵀ/n; U_z the n×(n−1) Helmert basis of 1⊥; Cayley(A) = (I − A/2)⁻¹(I + A/2).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

# ----------------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------------


def helmert_basis(n: int) -> torch.Tensor:
    """Orthonormal basis of 1⊥ ⊂ Rⁿ, shape (n, n−1): column k is (1,…,1, −k, 0,…)/√(k(k+1)) with k ones."""
    basis = torch.zeros(n, n - 1, dtype=torch.float64)
    for k in range(1, n):
        basis[:k, k - 1] = 1.0
        basis[k, k - 1] = -float(k)
        basis[:, k - 1] /= math.sqrt(k * (k + 1))
    return basis


def skew_basis(m: int) -> torch.Tensor:
    """The basis E_ij − E_ji of the m×m skew-symmetric matrices, (i, j) the strict upper triangle in row-major
    order, flattened: (m(m−1)/2, m·m)."""
    index = torch.triu_indices(m, m, offset=1)
    basis = torch.zeros(index.shape[1], m, m)
    basis[torch.arange(index.shape[1]), index[0], index[1]] = 1.0
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


def _logit(p: float) -> float:
    """σ⁻¹(p), with p clipped into [1e-4, 1 − 1e-4] so that saturated targets stay finite."""
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


# How strongly ``init_logits`` leans towards the identity on mixers that can only approach it.
IDENTITY_LOGIT = 4.0


class Mixer(nn.Module):
    """Base class: subclasses set ``num_logits`` and implement ``forward`` (and ``init_logits``)."""

    name: str
    num_logits: int

    def __init__(self, num_streams: int):
        super().__init__()
        self.num_streams = num_streams

    def init_logits(self) -> torch.Tensor:
        return torch.zeros(self.num_logits)

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        """The constant bases (non-persistent buffers) by name, rebuilt from the mixer's shape alone.

        ``from_pretrained`` re-creates non-persistent buffers empty, so the model's ``_init_weights`` refills
        them from here.
        """
        return {}

    def register_constant_buffers(self) -> None:
        for name, value in self.constant_buffers().items():
            self.register_buffer(name, value, persistent=False)

    def _eye(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.eye(self.num_streams, dtype=theta.dtype, device=theta.device)

    def extra_repr(self) -> str:
        return f"num_streams={self.num_streams}, num_logits={self.num_logits}"


# ----------------------------------------------------------------------------------------------------
# identity and unconstrained (HC)
# ----------------------------------------------------------------------------------------------------


class IdentityMixer(Mixer):
    """H = I: the plain residual (``num_streams=1`` gives a standard pre-norm transformer)."""

    name = "identity"

    def __init__(self, num_streams: int):
        super().__init__(num_streams)
        self.num_logits = 0

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        n = self.num_streams
        return self._eye(theta).expand(*theta.shape[:-1], n, n)


class UnconstrainedMixer(Mixer):
    """H = I + θ (Hyper-Connections, arXiv 2409.19606): no constraint, the gain can explode with depth."""

    name = "unconstrained"

    def __init__(self, num_streams: int):
        super().__init__(num_streams)
        self.num_logits = num_streams**2

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        n = self.num_streams
        return self._eye(theta) + theta.unflatten(-1, (n, n))


# ----------------------------------------------------------------------------------------------------
# Sinkhorn (mHC) with unrolled or implicit backward
# ----------------------------------------------------------------------------------------------------


def early_exit_tolerance(tensor: torch.Tensor, compiled: bool = False) -> float | None:
    """The row error below which the Sinkhorn rounds and Newton steps may stop (columns are exact after each
    column normalisation): 8 ulp of 1 in the tensor's dtype (1e-6 in float32, 2e-15 in the float64 polish), i.e.
    converged to float rounding. Only on CPU, where reading the residual on the host is a cheap sync, and not
    while autograd records the loop (the unrolled backward differentiates every step). In eager mode the loops
    test it with a Python ``break``; under ``torch.compile`` only where the caller can test it in the graph
    (``compiled=True``: the polish's ``torch.cond`` checkpoints) — otherwise None, never stop early."""
    recording = tensor.requires_grad and torch.is_grad_enabled()
    if tensor.device.type != "cpu" or recording or (torch.compiler.is_compiling() and not compiled):
        return None
    return 8 * torch.finfo(tensor.dtype).eps


# The row error from which the rounds hand over to the Newton polish, and the polish steps that then reach float64
# rounding (quadratic convergence: 2e-2 → 4e-4 → 2e-7 → 4e-14 → 2e-27).
NEWTON_BASIN, NEWTON_FROM_BASIN = 2e-2, 4


def sinkhorn_iterate(theta: torch.Tensor, iters: int, eps: float = 0.0, newton_steps: int = 0) -> torch.Tensor:
    """Sinkhorn–Knopp on exp(θ) (…, n, n): ``iters`` rounds of row then column normalisation.

    ``eps = 0`` runs its first round in the log domain (stable for any |θ|) and the others as float64
    divisions (see the comment in the loop), then polishes with ``newton_steps`` Newton
    steps on the scalings (``sinkhorn_newton``): plain SK converges only sublinearly when the target
    is near a permutation (row error ≈ 1e-1 after 20 rounds at |θ| ≤ 10), Newton reaches float precision.
    On CPU in eager mode the rounds stop early once the row error is within ``early_exit_tolerance`` (checked
    after the first round and every fourth), and so does the polish: decoding calls this per token and site.
    With at least ``NEWTON_FROM_BASIN`` polish steps to follow, the rounds stop as soon as the row error is
    within ``NEWTON_BASIN``: near the identity the rounds shrink it by ≈ 3% each (1.3e-2 after the first,
    7e-3 after 20, at θ = 4I + 0.05·N), while a Newton step, which costs about ten rounds, squares it. The
    result is the same fixed point (to float64 rounding), ≈ 1.4× faster near the identity. Under
    ``torch.compile`` (CPU, autograd not recording) that handover is tested once, after the first round.
    ``eps > 0`` is the probability-domain form of transformers' ``DeepseekV4HyperConnection``
    (softmax + eps, then ``P / (sum + eps)``), kept so that its checkpoints are reproduced exactly.
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
    row error is within ``tol`` (tested before the first and every fourth; None: never).

    After the first round every row and column keeps an entry ≥ 1/n² (a normalisation divides by a sum ≤ n), so
    these run as plain divisions in float64 (no exp/log per round); entries below e^-700 of their row's largest
    flush to zero (the log-domain rounds agreed to 1e-6 at |θ| ≤ 10)."""
    for i in range(rounds):
        if tol is not None and i % 4 == 0 and (p.sum(1) - 1).abs().max() <= tol:
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


NEWTON_CHECKPOINT = 2  # compiled polish: test convergence every this many steps (2 suffice near the identity)


def sinkhorn_newton(p: torch.Tensor, steps: int) -> torch.Tensor:
    """Newton's method for the scalings of P (n, n, …) (``matrix_first`` layout): diag(e^f) P diag(e^g) with
    unit row and column sums, in float64.

    The columns are normalised first, in float64 (the rounds may have stopped at float32 rounding). Each step
    then solves the scaling Jacobian for the row scaling f (``_scaling_solve`` with ∂col = 0: the columns are
    exact), rescales the rows by e^f — clipped to ±2, damping far from the solution (e.g. at |θ| ~ 1e4) — and
    normalises the columns exactly, which is the column half of the Newton step (the column scaling e^g would
    cancel in that normalisation, so it is never applied). Only the n row scalings see an exp, P never leaves
    the probability domain.

    On CPU the polish stops once the row error is within ``early_exit_tolerance`` (float64 rounding: a float32
    result is then doubly stochastic to its own rounding, which keeps converted models' equal streams equal
    over many sites): after any step in eager mode, and under ``torch.compile`` every ``NEWTON_CHECKPOINT``
    steps, through ``torch.cond`` — compiled decoding would otherwise run all ``steps`` for every token and
    site, each step a handful of tiny buffers.
    """
    p = p.double()
    return _newton_steps(p / p.sum(0, keepdim=True), steps) if steps else p


def _newton_steps(p: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` polish steps on P (float64, unit column sums), with the early exit of ``sinkhorn_newton``.

    The constants here and in ``_scaling_solve`` are literals, not defaults or module globals: under
    ``torch.compile(dynamic=True)`` dynamo lifts those to symbolic floats, which ``torch.cond`` branches reject.
    """
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
        f, _ = _scaling_solve(p, row, 1 - row)
        p = p * f.clamp(-2.0, 2.0).exp().unsqueeze(1)
        p = p / p.sum(0, keepdim=True)
    return p


def _scaling_solve(p, row, rhs_row, rhs_col=None):
    """(f, g) solving the scaling Jacobian J (f; g) = (rhs_row; rhs_col) for P (n, n, …) (``matrix_first``) with
    unit column sums, J = [[diag(row), P], [Pᵀ, I]] + ρI — the Jacobian of the scaling equations row = P1,
    col = Pᵀ1 at col = 1, and at the fixed point (row = 1) the adjoint system of the implicit backward —
    through its n×n Schur complement (d = 1 + ρ):

        S f = rhs_row − P rhs_col / d,   S = diag(row) + ρ − P Pᵀ / d + 11ᵀ,   g = (rhs_col − Pᵀ f) / d.

    rhs_col = None means 0, and then g is not formed (None). J is singular along (1, −1) (shifting f by t and
    g by −t leaves P unchanged), to which both right-hand sides here are orthogonal; the 11ᵀ term picks the
    solution with Σ f = 0, and the ridge ρ = 1e-9 keeps near-permutation P, whose extra null directions meet
    only zero entries of P, solvable. The products are broadcast sums over the small axes, vectorised over the
    tokens.
    """
    n, ridge = p.shape[0], 1e-9
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

    The system (``_scaling_solve``) is singular along (1, −1), to which the right-hand side is
    orthogonal. Exact for the converged map, which the Newton polish in the forward provides.
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
    a, b = _scaling_solve(p64, torch.ones_like(gp_col), gp.sum(1), gp_col)
    return matrix_last(p64 * (g64 - a.unsqueeze(1) - b.unsqueeze(0)), p.dtype)


class SinkhornMixer(Mixer):
    """H = Sinkhorn–Knopp(exp θ), doubly stochastic up to the iteration error (mHC, arXiv 2512.24880).

    ``backward="unrolled"`` differentiates through every iteration (memory O(iters·n²) per token);
    ``backward="implicit"`` saves only H and solves the adjoint of the fixed point (O(n²)).
    """

    name = "sinkhorn"
    BACKWARDS = ("implicit", "unrolled")

    def __init__(
        self, num_streams: int, iters: int = 20, backward: str = "implicit", eps: float = 0.0, newton_steps: int = 8
    ):
        super().__init__(num_streams)
        self.num_logits = num_streams**2
        self.iters, self.backward, self.eps, self.newton_steps = iters, backward, eps, newton_steps

    def init_logits(self) -> torch.Tensor:
        return (IDENTITY_LOGIT * torch.eye(self.num_streams)).flatten()

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        n = self.num_streams
        theta = theta.unflatten(-1, (n, n))
        if self.backward == "implicit" and torch.is_grad_enabled():
            return SinkhornImplicitFunction.apply(theta, self.iters, self.eps, self.newton_steps)
        return sinkhorn_iterate(theta, self.iters, self.eps, self.newton_steps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, iters={self.iters}+{self.newton_steps} Newton, backward={self.backward!r}"


# ----------------------------------------------------------------------------------------------------
# permutation mixture (mHC-lite) and Kronecker factors (KromHC)
# ----------------------------------------------------------------------------------------------------


class PermutationMixer(Mixer):
    """H = Σ_k softmax(θ)_k P_k over all n! permutation matrices (mHC-lite): exactly doubly stochastic."""

    name = "permutation"
    MAX_STREAMS = 6  # 6! = 720 logits; 7! = 5040 makes the projection larger than the model

    def __init__(self, num_streams: int):
        super().__init__(num_streams)
        self.num_logits = math.factorial(num_streams)
        self.register_constant_buffers()

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        eye = torch.eye(self.num_streams)
        perms = itertools.permutations(range(self.num_streams))  # the first is the identity
        return {"permutations": torch.stack([eye[list(p)] for p in perms])}  # (n!, n, n)

    def init_logits(self) -> torch.Tensor:
        logits = torch.zeros(self.num_logits)
        logits[0] = IDENTITY_LOGIT + math.log(self.num_logits)  # identity carries ≈ e⁴/(1+e⁴) of the mass
        return logits

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(theta, dim=-1)
        return torch.einsum("...k,kst->...st", weights, self.permutations.to(weights.dtype))


class KroneckerMixer(Mixer):
    """H = U_1 ⊗ … ⊗ U_K with U_k = [[p, 1−p], [1−p, p]], p = σ(θ_k) (KromHC): n = 2^K, exactly doubly stochastic.

    Entry by entry, H[s, t] = Π_k (p_k if s and t agree in bit k else 1 − p_k), bit 1 the most significant
    (U_1 is the outermost factor): one ``where`` and one product, whatever K.
    """

    name = "kronecker"

    def __init__(self, num_streams: int):
        super().__init__(num_streams)
        self.num_logits = int(math.log2(num_streams))
        self.register_constant_buffers()

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        bits = 1 << torch.arange(self.num_logits - 1, -1, -1)  # (K,), U_1's bit first
        index = torch.arange(self.num_streams)
        return {"same_bit": (index[:, None, None] & bits) == (index[None, :, None] & bits)}  # (n, n, K)

    def init_logits(self) -> torch.Tensor:
        return torch.full((self.num_logits,), IDENTITY_LOGIT)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(theta)[..., None, None, :]  # (…, 1, 1, K)
        return torch.where(self.same_bit, p, 1 - p).prod(-1)


# ----------------------------------------------------------------------------------------------------
# spectral sphere (sHC) and transportation polytope (TBP)
# ----------------------------------------------------------------------------------------------------


class SpectralMixer(Mixer):
    """H = J + U_z U diag(s) Vᵀ U_zᵀ with U, V = Cayley(skew) and s = tanh(·) (sHC).

    Rows and columns sum to 1, ‖H‖₂ ≤ 1, negative entries allowed. θ = [U logits, V logits, s logits].
    """

    name = "spectral"

    def __init__(self, num_streams: int):
        super().__init__(num_streams)
        m = num_streams - 1
        self.num_skew = m * (m - 1) // 2
        self.num_logits = 2 * self.num_skew + m
        self.register_constant_buffers()

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        m = self.num_streams - 1
        return {"helmert": helmert_basis(self.num_streams).float(), "skew_basis": skew_basis(m)}

    def init_logits(self) -> torch.Tensor:
        logits = torch.zeros(self.num_logits)
        logits[2 * self.num_skew :] = IDENTITY_LOGIT / 2  # s = tanh(2) ≈ 0.96
        return logits

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        m, k = self.num_streams - 1, self.num_skew
        u = cayley(skew_from_logits(theta[..., :k], self.skew_basis, m))
        v = cayley(skew_from_logits(theta[..., k : 2 * k], self.skew_basis, m))
        s = torch.tanh(theta[..., 2 * k :])
        core = (u * s.unsqueeze(-2)) @ v.transpose(-1, -2)  # (…, m, m)
        basis = self.helmert.to(theta.dtype)
        n = self.num_streams
        return torch.full((n, n), 1.0 / n, dtype=theta.dtype, device=theta.device) + basis @ core @ basis.T


class TransportMixer(Mixer):
    """TBP-mHC: fill the top-left (n−1)×(n−1) entries row by row inside the transportation-polytope bounds

        L_ij = max(0, R_i − Σ_{k>j} C_k),  U_ij = min(R_i, C_j),  X_ij = L_ij + (U_ij − L_ij) σ(θ_ij),

    with R_i, C_j the row and column budgets still open; the last column and row take what remains.
    Every choice in [L, U] leaves a feasible completion, so H is exactly doubly stochastic.
    """

    name = "transport"

    def __init__(self, num_streams: int):
        super().__init__(num_streams)
        self.num_logits = (num_streams - 1) ** 2

    def init_logits(self) -> torch.Tensor:
        m = self.num_streams - 1
        return (2 * IDENTITY_LOGIT * torch.eye(m) - IDENTITY_LOGIT).flatten()

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        n, m = self.num_streams, self.num_streams - 1
        gate = torch.sigmoid(theta).unflatten(-1, (m, m)) if m else theta
        col_budget = list(theta.new_ones(n).expand(*theta.shape[:-1], n).unbind(-1))
        rows = []
        for i in range(m):
            row_budget, row = torch.ones_like(col_budget[0]), []
            for j in range(m):
                later_cols = sum(col_budget[j + 1 :])
                low = torch.clamp(row_budget - later_cols, min=0.0)
                high = torch.minimum(row_budget, col_budget[j])
                x = low + (high - low) * gate[..., i, j]
                row.append(x)
                row_budget = row_budget - x
                col_budget[j] = col_budget[j] - x
            row.append(row_budget)  # last column takes the row's remainder
            col_budget[m] = col_budget[m] - row_budget
            rows.append(torch.stack(row, -1))
        rows.append(torch.stack(col_budget, -1))  # last row takes every column's remainder
        return torch.stack(rows, -2)


# ----------------------------------------------------------------------------------------------------
# orthogonal mixers from JPmHC: Stiefel (Cayley) and rank-p Grassmann
# ----------------------------------------------------------------------------------------------------


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


class StiefelMixer(Mixer):
    """H = Cayley(θ − θᵀ) ∈ SO(n) (JPmHC, arXiv 2602.18308): exactly orthogonal, all singular values 1.

    ``method="solve"`` is exact for any θ; ``method="iterative"`` uses ``iters`` fixed-point steps (GPU
    friendly matmuls, O(n²) saved state) and needs ‖θ − θᵀ‖₂ < 2 to converge.
    """

    name = "stiefel"
    METHODS = ("solve", "iterative")

    def __init__(self, num_streams: int, method: str = "solve", iters: int = 12):
        super().__init__(num_streams)
        self.num_logits = num_streams * (num_streams - 1) // 2
        self.method, self.iters = method, iters
        self.register_constant_buffers()

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        return {"skew_basis": skew_basis(self.num_streams)}

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        skew = skew_from_logits(theta, self.skew_basis, self.num_streams)
        if self.method == "iterative":
            return CayleyIterativeFunction.apply(skew, self.iters)
        return cayley(skew)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.method!r}"


class GrassmannMixer(Mixer):
    """H = J + Q R Qᵀ of rank p + 1: a mean-preserving mixer acting orthogonally on a p-dimensional subspace.

    JPmHC's rank-p variant; its exact form is not public and this construction is ours:
    Q = U_z Cayley(B)[:, :p] ∈ St(n, p) spans a subspace of 1⊥, with B = [[0, −Kᵀ], [K, 0]] and
    K ∈ R^{(n−1−p)×p} a chart of the Grassmannian Gr(p, n−1); R = Cayley(C) ∈ SO(p), C skew.
    Rows and columns sum to 1; singular values 1 (mean), 1 (×p), 0 (×(n−1−p)).
    r = p(n−1−p) + p(p−1)/2 ≤ p(n−1); p = n−1 gives an orthogonal mean-preserving mixer.
    """

    name = "grassmann"

    def __init__(self, num_streams: int, rank: int | None = None):
        super().__init__(num_streams)
        m = num_streams - 1
        self.rank = m if rank is None else rank
        p = self.rank
        self.num_chart = (m - p) * p
        self.num_logits = self.num_chart + p * (p - 1) // 2
        self.register_constant_buffers()

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        m, p = self.num_streams - 1, self.rank
        chart_index = torch.stack(torch.meshgrid(torch.arange(p, m), torch.arange(p), indexing="ij")).flatten(1)
        return {
            "helmert": helmert_basis(self.num_streams).float(),
            "chart_index": chart_index,  # the lower-left block of B
            "rotation_basis": skew_basis(p),
        }

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        n, m, p = self.num_streams, self.num_streams - 1, self.rank
        chart = theta.new_zeros(*theta.shape[:-1], m, m)
        chart[..., self.chart_index[0], self.chart_index[1]] = theta[..., : self.num_chart]
        frame = cayley(chart - chart.transpose(-1, -2))[..., :p]  # (…, m, p), orthonormal columns
        q = self.helmert.to(theta.dtype) @ frame  # (…, n, p) ⊂ 1⊥
        r = cayley(skew_from_logits(theta[..., self.num_chart :], self.rotation_basis, p))
        mean = torch.full((n, n), 1.0 / n, dtype=theta.dtype, device=theta.device)
        return mean + q @ r @ q.transpose(-1, -2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


# ----------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------

MIXERS: dict[str, type[Mixer]] = {
    cls.name: cls
    for cls in (
        IdentityMixer,
        UnconstrainedMixer,
        SinkhornMixer,
        PermutationMixer,
        KroneckerMixer,
        SpectralMixer,
        TransportMixer,
        StiefelMixer,
        GrassmannMixer,
    )
}
ALIASES = {"hc": "unconstrained", "mhc": "sinkhorn", "mhc-lite": "permutation", "kromhc": "kronecker",
           "shc": "spectral", "tbp": "transport", "cayley": "stiefel", "jpmhc": "stiefel"}  # fmt: skip
# Mixers whose Hᵀ1 = 1 for every θ (needed for function preservation while the streams are equal).
MEAN_PRESERVING = {"identity", "sinkhorn", "permutation", "kronecker", "spectral", "transport", "grassmann"}


def canonical_mixer_name(name: str) -> str:
    """Resolve a mixer name or paper alias; raise a ValueError listing the valid names otherwise."""
    key = ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else None
    if key not in MIXERS:
        valid = ", ".join(sorted(MIXERS)) + "; aliases: " + ", ".join(f"{a}→{t}" for a, t in ALIASES.items())
        raise ValueError(f"mixer={name!r} is not a known mixer. Valid values: {valid}")
    return key


def validate_mixer(name: str, num_streams: int, grassmann_rank: int | None = None) -> str:
    """Check that ``name`` works with ``num_streams`` streams; return the canonical name."""
    key = canonical_mixer_name(name)
    n = num_streams
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_streams must be a positive integer, got {n!r}")
    if key == "permutation" and n > PermutationMixer.MAX_STREAMS:
        raise ValueError(
            f"mixer='permutation' needs num_streams <= {PermutationMixer.MAX_STREAMS} "
            f"(it has n! = {math.factorial(n)} logits), got {n}; use 'sinkhorn', 'kronecker' or 'stiefel' for more streams"
        )
    if key == "kronecker" and (n < 2 or n & (n - 1)):
        raise ValueError(f"mixer='kronecker' needs num_streams to be a power of 2 (≥ 2), got {n}")
    if key in ("spectral", "transport", "grassmann") and n < 2:
        raise ValueError(f"mixer={key!r} needs num_streams >= 2, got {n}")
    if key == "grassmann" and grassmann_rank is not None and not 1 <= grassmann_rank <= n - 1:
        raise ValueError(f"grassmann_rank must be in 1..num_streams-1 = 1..{n - 1}, got {grassmann_rank}")
    return key


def build_mixer(
    name: str,
    num_streams: int,
    *,
    sinkhorn_iters: int = 20,
    sinkhorn_backward: str = "implicit",
    sinkhorn_eps: float = 0.0,
    sinkhorn_newton_steps: int = 8,
    cayley_method: str = "solve",
    cayley_iters: int = 12,
    grassmann_rank: int | None = None,
) -> Mixer:
    """Build a mixer by name (or paper alias) with its options; invalid combinations raise ValueError."""
    key = validate_mixer(name, num_streams, grassmann_rank)
    if key == "sinkhorn":
        return SinkhornMixer(
            num_streams, iters=sinkhorn_iters, backward=sinkhorn_backward, eps=sinkhorn_eps, newton_steps=sinkhorn_newton_steps
        )
    if key == "stiefel":
        return StiefelMixer(num_streams, method=cayley_method, iters=cayley_iters)
    if key == "grassmann":
        return GrassmannMixer(num_streams, rank=grassmann_rank)
    return MIXERS[key](num_streams)
