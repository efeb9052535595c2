"""Figures: predicted vs empirical Jacobian spectra, and Amax gains over depth (matplotlib, Agg backend).

Both save atomically (``hf_jpmhc.outputs.atomic_path``), so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..outputs import atomic_path
from .gain import GainReport


@dataclass
class SpectrumPanel:
    """One mixer's panel: predicted density ρ(s) on ``grid`` and the empirical squared singular values."""

    title: str
    grid: torch.Tensor | None  # s (P,)
    density: torch.Tensor | None  # ρ(s) (P,)
    empirical: torch.Tensor  # eigenvalues of JᵀJ, pooled over the Monte-Carlo models


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    with atomic_path(path) as staging:
        fig.savefig(staging, dpi=120, bbox_inches="tight")


def plot_spectra(panels: list[SpectrumPanel], path: str, suptitle: str = "") -> None:
    """One panel per mixer: density of log10 σ² (σ² = squared singular value of ∂X_L/∂X_0, dimensionless)."""
    plt = _figure()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        values = panel.empirical.double()
        lo = math.log10(panel.grid[0].item()) if panel.grid is not None else math.log10(values[values > 0].min().item())
        hi = math.log10(panel.grid[-1].item()) if panel.grid is not None else math.log10(values.max().item())
        inside = values[(values > 10**lo) & (values < 10**hi)]
        below = (values <= 10**lo).double().mean().item()
        weights = torch.full_like(inside, 1.0 / values.numel())
        ax.hist(inside.log10().numpy(), bins=40, range=(lo, hi), weights=weights.numpy() * 40 / (hi - lo),
                color="tab:blue", alpha=0.45, label=f"Monte-Carlo ({below:.0%} below range)")  # fmt: skip
        if panel.grid is not None:
            log_density = panel.density * panel.grid * math.log(10)  # density of log10 s
            ax.plot(panel.grid.log10().numpy(), log_density.numpy(), color="tab:red", lw=2, label="free-probability prediction")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("log10 σ²  (squared singular value of ∂X_L/∂X_0, dimensionless)", fontsize=8)
        ax.set_ylabel("density per unit log10 σ²", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_gains(report: GainReport, path: str, title: str = "") -> None:
    """Per-site and composite Amax gains (forward: max row sum, backward: max column sum) over depth."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    sites = range(1, len(report.site_names) + 1)
    ax.plot(sites, report.site_forward.numpy(), "o-", ms=3, label="per site, forward (max row sum |H|)")
    ax.plot(sites, report.site_backward.numpy(), "s--", ms=3, label="per site, backward (max column sum |H|)")
    ax.plot(sites, report.composite_forward.numpy(), "-", lw=2, label="composite H₁⋯H_k, forward")
    ax.plot(sites, report.composite_backward.numpy(), "--", lw=2, label="composite H₁⋯H_k, backward")
    values = torch.cat([report.site_forward, report.site_backward, report.composite_forward, report.composite_backward])
    low, high = values.min().item(), values.max().item()
    if high > 10 * low > 0:
        ax.set_yscale("log")
    else:  # a flat curve at 1 would otherwise be stretched over rounding noise
        ax.set_ylim(min(low, 1.0) - 0.1, max(high, 1.0) + 0.1)
        ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("hyper-connection site k (2 per decoder layer: attention, MLP)")
    ax.set_ylabel(f"Amax gain (dimensionless{', log scale' if ax.get_yscale() == 'log' else ''})")
    ax.set_title(title or "Amax gain (SPEC §4), max over tokens")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
