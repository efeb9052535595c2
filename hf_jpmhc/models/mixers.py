"""The residual mixers: maps from unconstrained logits θ to an n×n matrix H on a manifold (SPEC §2).

Every mixer is a parameter-free ``nn.Module`` (its constant bases live in non-persistent buffers, so they
follow ``.to(device)``) with

* ``num_logits``    — r, the number of free logits for its ``n``;
* ``forward(θ)``    — θ ``[..., r]`` → H ``[..., n, n]``, computed in float32 (or float64 when θ is);
* ``init_logits()`` — the logits whose H is the identity, or the closest the manifold allows; the
  hyper-connection starts its static bias there;
* ``kernel(backend)`` — its maths in a fused backend ("triton", "cpu"), as a name and arguments that backend
  knows, or None: the backend then calls ``forward``. The hyper-connection never inspects which mixer it has.

The hyper-connection applies H transposed: ``X' = Hᵀ X + post ⊗ f`` (see ``hyper_connection.py``).

Notation: n streams; J = 11ᵀ/n; U_z the n×(n−1) Helmert basis of 1⊥; Cayley(A) = (I − A/2)⁻¹(I + A/2).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from .cayley import CayleyIterativeFunction, cayley, skew_basis, skew_from_logits, skew_pairs
from .sinkhorn import SinkhornImplicitFunction, sinkhorn_iterate

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


# How strongly ``init_logits`` leans towards the identity on mixers that can only approach it.
IDENTITY_LOGIT = 4.0


class Mixer(nn.Module):
    """Base class: subclasses set ``num_logits`` and implement ``forward`` (and ``init_logits``)."""

    name: str
    num_logits: int
    mean_preserving = False  # Hᵀ1 = 1 for every θ: equal streams stay equal (function preservation while they are)

    def __init__(self, num_streams: int):
        super().__init__()
        self.num_streams = num_streams

    def init_logits(self) -> torch.Tensor:
        return torch.zeros(self.num_logits)

    def kernel(self, backend: str) -> tuple | None:
        """This mixer's maths in the fused ``backend`` ("triton": hf_jpmhc.ops' kernels, "cpu": the C++ read of
        kernel_backend="compiled"), as (kernel name, *arguments), or None when that backend has none for it."""
        return None

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
    mean_preserving = True

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


class SinkhornMixer(Mixer):
    """H = Sinkhorn–Knopp(exp θ), doubly stochastic up to the iteration error (mHC, arXiv 2512.24880).

    ``backward="unrolled"`` differentiates through every iteration (memory O(iters·n²) per token);
    ``backward="implicit"`` saves only H and solves the adjoint of the fixed point (O(n²)).
    """

    name = "sinkhorn"
    mean_preserving = True
    BACKWARDS = ("implicit", "unrolled")

    def __init__(
        self, num_streams: int, iters: int = 20, backward: str = "implicit", eps: float = 0.0, newton_steps: int = 8
    ):
        super().__init__(num_streams)
        self.num_logits = num_streams**2
        self.iters, self.backward, self.eps, self.newton_steps = iters, backward, eps, newton_steps

    def init_logits(self) -> torch.Tensor:
        return (IDENTITY_LOGIT * torch.eye(self.num_streams)).flatten()

    def kernel(self, backend: str) -> tuple | None:
        """The log-domain rounds + Newton polish (eps = 0) in C++; in Triton too with the implicit backward."""
        if self.eps == 0 and (backend == "cpu" or (backend == "triton" and self.backward == "implicit")):
            return "sinkhorn", self.iters, self.newton_steps
        return None

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
    mean_preserving = True
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
    mean_preserving = True

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

    def kernel(self, backend: str) -> tuple | None:
        return ("kronecker", self.same_bit) if backend == "cpu" else None

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
    mean_preserving = True

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
    mean_preserving = True

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
        return {"skew_basis": skew_basis(self.num_streams), "skew_pairs": skew_pairs(self.num_streams)}

    def kernel(self, backend: str) -> tuple | None:
        """The exact solve in C++ (float64 Gauss–Jordan), the iterative fixed point in Triton."""
        if backend == "cpu" and self.method == "solve":
            return "cayley", self.skew_pairs
        if backend == "triton" and self.method == "iterative":
            return "cayley_iterative", self.skew_basis, self.iters
        return None

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
    mean_preserving = True

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
