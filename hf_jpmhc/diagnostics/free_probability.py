"""Free-probability prediction of the end-to-end Jacobian spectrum of a hyper-connected stack (SPEC §4).

Per token, site k maps the streams X ∈ R^{n×C} linearly (at initialisation, Φ = 0):

    J_k = a_k ⊗ I_C + b_k ⊗ W_k,     a_k = H_kᵀ,   b_k = post_k pre_kᵀ,   W_k ~ N(0, g_k²/C)       (1)

and the stream map X_K ← X_0 has Jacobian J = J_K ⋯ J_1 (N = nC). As C → ∞ the W_k become free circular
elements with τ(W W*) = g_k², free from each other and from M_n ⊗ 1, so the J_k are *free with
amalgamation over M_n*. This module computes, for given (a_k, b_k, g_k) — i.e. conditionally on the n×n
mixers — the law of the squared singular values of J (the eigenvalues of J Jᵀ) without sampling:

* ``jacobian_moments``: m₁ = tr(JJᵀ)/N and m₂ = tr((JJᵀ)²)/N by the M_n-valued recursion (2)–(3) of
  docs/free_probability.md (m₁ is exact for every C, m₂ exact as C → ∞);
* ``jacobian_density``: the density, from the M_n-valued Dyson equation of a self-adjoint linearisation
  of [[0, J], [Jᵀ, 0]] (block tridiagonal, solved by Schur sweeps).

``predict_spectrum`` averages both over the ensemble's random mixers (n×n draws only: the finite-n
randomness of H is not a large-dimension effect, so free probability does not remove it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .ensemble import RandomHyperConnectionEnsemble, SiteCoefficients


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a ⊗ b: (…, n, n), (…, n, n) → (…, n², n²), so that vec(a X bᵀ) = (a ⊗ b) vec(X) row-major."""
    n = a.shape[-1]
    return (a[..., :, None, :, None] * b[..., None, :, None, :]).reshape(*a.shape[:-2], n * n, n * n)


def _layer_factors(coefficients: SiteCoefficients, branch_gain: torch.Tensor | float):
    """a_k = H_kᵀ, b_k = post_k pre_kᵀ (…, K, n, n) and g_k² (…, K) in float64, from eq. (1)."""
    a = coefficients.mixer.double().transpose(-1, -2)
    b = coefficients.post.double().unsqueeze(-1) * coefficients.pre.double().unsqueeze(-2)
    gain_sq = torch.as_tensor(branch_gain, dtype=torch.float64) ** 2 * torch.ones(a.shape[:-2], dtype=torch.float64)
    return a, b, gain_sq


def jacobian_moments(
    coefficients: SiteCoefficients, branch_gain: torch.Tensor | float, branch_kappa4: torch.Tensor | float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(m₁, m₂) of the squared singular values of J = J_K ⋯ J_1, per draw (…).

    With S_k = E[P_k P_kᵀ] ∈ M_n and Φ_k(D) = E[P_k P_kᵀ D P_k P_kᵀ] (P_k = J_k ⋯ J_1, E = id ⊗ τ):

        vec S_k = T_k vec S_{k−1},          T_k = a_k ⊗ a_k + g_k² b_k ⊗ b_k                       (2)
        Φ_k = T_k Φ_{k−1} T_kᵀ + η ⊗ aSaᵀ + aSaᵀ ⊗ η + (1 + β_k) η ⊗ η,
                                             η = g_k² b_k S b_kᵀ, S = S_{k−1}                       (3)

    and m₁ = tr S_K / n, m₂ = tr Φ_K(I) / n. ``branch_gain`` is g, scalar or per site (…, K).
    ``branch_kappa4`` is β = κ₄/κ₂², the normalised fourth free cumulant of an R-diagonal branch
    Jacobian, scalar or per site (…, K): 0 for a circular (Gaussian) branch, 1 for a product of two
    square Gaussian matrices (attention's W_o W_v); it enters only the four-branch term of (3).
    """
    a, b, gain_sq = _layer_factors(coefficients, branch_gain)
    kappa4 = torch.as_tensor(branch_kappa4, dtype=torch.float64) * torch.ones_like(gain_sq)
    n = a.shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    batch = a.shape[:-3]
    cov = eye.expand(*batch, n, n).clone()  # S_0 = I
    second = torch.eye(n * n, dtype=torch.float64).expand(*batch, n * n, n * n).clone()  # Φ_0 = id
    for k in range(a.shape[-3]):
        ak, bk, gk, beta = a[..., k, :, :], b[..., k, :, :], gain_sq[..., k, None, None], kappa4[..., k, None, None]
        transfer = _kron(ak, ak) + gk * _kron(bk, bk)
        skip = ak @ cov @ ak.transpose(-1, -2)
        branch = gk * bk @ cov @ bk.transpose(-1, -2)
        second = (transfer @ second @ transfer.transpose(-1, -2) + _kron(branch, skip) + _kron(skip, branch)
                  + (1 + beta) * _kron(branch, branch))  # fmt: skip
        cov = skip + branch
    vec_eye = eye.reshape(n * n)
    m1 = cov.diagonal(dim1=-2, dim2=-1).sum(-1) / n
    m2 = (vec_eye * (second @ vec_eye)).sum(-1) / n
    return m1, m2


def jacobian_density(
    coefficients: SiteCoefficients,
    branch_gain: torch.Tensor | float,
    grid: torch.Tensor,
    *,
    broadening: float = 0.02,
    internal_eps: float = 1e-7,
    max_iters: int = 3000,
    tol: float = 1e-5,
) -> torch.Tensor:
    """Density of the squared singular values s of J at ``grid`` (P,), per draw (…, P), in 1/(unit of s).

    Self-adjoint linearisation of 𝐇 = [[0, J], [Jᵀ, 0]] on 2K block nodes (p, I1_1, I2_1, …, I1_{K−1},
    I2_{K−1}, q): node pairs (2i, 2i+1) are coupled by −J_{K−i} (and −J_{K−i}ᵀ), pairs (2i−1, 2i) by I; the
    diagonal is λ on p, q and iε inside. The Schur complement onto (p, q) is λ − 𝐇, so
    E[(Λ − 𝓛)⁻¹]_pp = λ (λ² − JJᵀ)⁻¹ in expectation. G = E[(Λ − 𝓛)⁻¹] solves the Dyson equation

        G = (Λ − 𝓛₀ − Σ(G))⁻¹,    Σ(G)_{2i} = g² b G_{2i+1} bᵀ,  Σ(G)_{2i+1} = g² bᵀ G_{2i} b  (b = b_{K−i}),

    whose diagonal blocks we get by left/right Schur sweeps. λ = √s·e^{iφ} with φ = ``broadening``/2, i.e.
    a relative (log-uniform) imaginary part of ``broadening``; ρ(s) = −Im tr G_pp / (π n λ).
    """
    a, b, gain_sq = _layer_factors(coefficients, branch_gain)
    batch, (num_sites, n) = a.shape[:-3], a.shape[-3:-1]
    a, b, gain_sq = a.reshape(-1, num_sites, n, n), b.reshape(-1, num_sites, n, n), gain_sq.reshape(-1, num_sites)
    draws, points, nodes = a.shape[0], grid.numel(), 2 * num_sites
    cdt = torch.complex128
    eye = torch.eye(n, dtype=cdt)
    lam = grid.double().sqrt().to(cdt) * complex(math.cos(broadening / 2), math.sin(broadening / 2))  # (P,)

    # Edge i (nodes 2i, 2i+1) carries site K−1−i (0-based), the (i+1)-th factor from the left of J_K ⋯ J_1.
    order = torch.arange(num_sites - 1, -1, -1)
    a_e, b_e, g_e = a[:, order].to(cdt), b[:, order].to(cdt), gain_sq[:, order].to(cdt)  # (D, K, n, n)
    upper = [None] * (nodes - 1)  # block (j, j+1), shape broadcastable to (D, P, n, n)
    lower = [None] * (nodes - 1)  # block (j+1, j)
    for j in range(nodes - 1):
        if j % 2 == 0:
            upper[j] = -a_e[:, j // 2, None]
            lower[j] = -a_e[:, j // 2, None].transpose(-1, -2)
        else:
            upper[j] = lower[j] = eye
    diag0 = torch.full((draws, points, nodes), 1j * internal_eps, dtype=cdt)
    diag0[:, :, 0] = diag0[:, :, -1] = lam
    diag0 = diag0[..., None, None] * eye  # (D, P, nodes, n, n)

    green = torch.zeros(draws, points, nodes, n, n, dtype=cdt)
    b_even, g_even = b_e[:, None], g_e[:, None, :, None, None]  # (D, 1, K, n, n), (D, 1, K, 1, 1)
    for _ in range(max_iters):
        sigma = torch.zeros_like(green)
        sigma[:, :, 0::2] = g_even * b_even @ green[:, :, 1::2] @ b_even.transpose(-1, -2)
        sigma[:, :, 1::2] = g_even * b_even.transpose(-1, -2) @ green[:, :, 0::2] @ b_even
        diag = diag0 - sigma
        left, right = [None] * nodes, [None] * nodes
        left[0], right[-1] = diag[:, :, 0], diag[:, :, -1]
        for j in range(1, nodes):
            left[j] = diag[:, :, j] - lower[j - 1] @ torch.linalg.solve(left[j - 1], upper[j - 1].expand_as(left[j - 1]))
        for j in range(nodes - 2, -1, -1):
            right[j] = diag[:, :, j] - upper[j] @ torch.linalg.solve(right[j + 1], lower[j].expand_as(right[j + 1]))
        new = torch.linalg.inv(torch.stack(left, 2) + torch.stack(right, 2) - diag)
        change = (new - green).abs().amax() / new.abs().amax().clamp_min(1e-300)
        green = 0.5 * (green + new)
        if change < tol:
            break
    stieltjes = green[:, :, 0].diagonal(dim1=-2, dim2=-1).sum(-1) / (n * lam)  # E tr (λ² − JJᵀ)⁻¹ / N
    density = (-stieltjes.imag / math.pi).clamp_min(0.0)
    return density.reshape(*batch, points)


@dataclass
class SpectrumPrediction:
    """Predicted law of the squared singular values for one ensemble (averaged over mixer draws)."""

    ensemble: RandomHyperConnectionEnsemble
    mean: float  # m₁ = E tr(JJᵀ)/N
    second_moment: float  # m₂ = E tr((JJᵀ)²)/N
    grid: torch.Tensor | None = None  # s values (P,)
    density: torch.Tensor | None = None  # ρ(s) (P,), averaged over draws


def predict_spectrum(
    ensemble: RandomHyperConnectionEnsemble,
    *,
    num_draws: int = 256,
    density_draws: int = 8,
    grid: torch.Tensor | None = None,
    seed: int = 1234,
) -> SpectrumPrediction:
    """Moments (over ``num_draws`` mixer draws) and, if ``grid`` is given, the density (``density_draws``)."""
    if num_draws < 1 or density_draws < 1:
        raise ValueError(f"num_draws and density_draws must be >= 1, got {num_draws}, {density_draws}")
    generator = torch.Generator().manual_seed(seed)
    coefficients = ensemble.sample_coefficients(num_draws, generator)
    m1, m2 = jacobian_moments(coefficients, ensemble.branch_gain)
    prediction = SpectrumPrediction(ensemble, m1.mean().item(), m2.mean().item())
    if grid is not None:
        subset = SiteCoefficients(*(t[:density_draws] for t in (coefficients.pre, coefficients.post, coefficients.mixer)))
        prediction.grid = grid
        prediction.density = jacobian_density(subset, ensemble.branch_gain, grid).mean(0)
    return prediction
