"""H dynamics during training (issue 22): how far each site's residual mixer H has moved, whether it keeps its
manifold, and how the branches read and write the streams — measured on a fixed probe batch under ``no_grad``,
cheap enough to leave on in every run (one forward of the probe per logged step).

Per site (one ``HyperConnection``), from the coefficients it computes on the probe's tokens t (SPEC §1):

    h_dist_init      mean_t ‖H_t − H_init‖_F   H_init = the mixer at its initial logits (Φ = 0): the distance travelled
    h_dist_identity  mean_t ‖H_t − I‖_F
    h_dist_uniform   mean_t ‖H_t − J‖_F        J = 11ᵀ/n: how close H is to uniform mixing (a collapse)
    h_norm           max_t ‖H_t‖₂
    row_residual     max_t max|H_t 1 − 1|       column_residual   max_t max|H_tᵀ 1 − 1|
    orth_residual    max_t ‖H_tᵀ H_t − I‖_F     (which residual is the mixer's own constraint depends on the mixer)
    pre_entropy      mean_t entropy of pre_t / Σ pre_t in nats (log n: the branch reads every stream alike)
    post_entropy     the same for post (how evenly the branch writes back)
    alpha_pre, alpha_post, alpha_res    the learned scales α of the dynamic part

Over the sites: means (distances, entropies, α), maxima (norm, residuals), the least-moved site's distance
(``h_dist_init_min``) and the composite Amax gains of SPEC §4 (``gain.gain_report``: P_k = H_1 ⋯ H_k, the largest
forward and backward gain over every depth k and token).

``DynamicsMonitor`` turns this into log records for ``training.common.train_loop`` and warns, once, when a learned
mixer is still at its initialisation or has gone back to the identity — ``min(h_dist_init, h_dist_identity)`` below
a threshold at a given step: the "identity degeneration" users of mHC ports report, in both its senses (H never
learns; H collapses onto I, sHC's) — with ``IdentityDegenerationWarning``, naming the sites (``can_move`` says which
sites are checked).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..models.hyper_connection import HyperConnection
from .gain import gain_report, hyper_connection_sites, observe_reads, stack_site_mixers

# Metrics logged for every site (the others only aggregated): keeps a depth-64 record at ~800 numbers.
SITE_METRICS = ("h_dist_init", "h_dist_identity", "h_norm", "pre_entropy", "post_entropy", "alpha_res")
MEAN_METRICS = ("h_dist_init", "h_dist_identity", "h_dist_uniform", "pre_entropy", "post_entropy",
                "alpha_pre", "alpha_post", "alpha_res")  # fmt: skip
MAX_METRICS = ("h_norm", "row_residual", "column_residual", "orth_residual")
PREFIX = "hc/"


class IdentityDegenerationWarning(UserWarning):
    """A learned residual mixer H has not left its initialisation after the configured number of steps."""


def initial_mixer(hc: HyperConnection) -> torch.Tensor:
    """H at initialisation (Φ = 0, b_res = the mixer's identity logits), (n, n) in float64 — token-independent."""
    n, r = hc.num_streams, hc.mixer.num_logits
    logits = hc.initial_bias()[2 * n :].to(hc.bias.device)  # (r,)
    with torch.no_grad():
        return hc.mixer(logits).double() if r else torch.eye(n, dtype=torch.float64, device=hc.bias.device)


def entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the positive weights (…, n) normalised to sum to 1: (…)."""
    p = weights / weights.sum(-1, keepdim=True)
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def site_metrics(pre: torch.Tensor, post: torch.Tensor, mixer: torch.Tensor, h_init: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-site metrics of the module docstring from pre (…, n), post (…, n), H (…, n, n) over the probe tokens."""
    n = mixer.shape[-1]
    h = mixer.reshape(-1, n, n).double()  # (tokens, n, n); static sites have one "token"
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    frobenius = torch.linalg.matrix_norm
    return {
        "h_dist_init": frobenius(h - h_init).mean(),
        "h_dist_identity": frobenius(h - eye).mean(),
        "h_dist_uniform": frobenius(h - 1.0 / n).mean(),
        "h_norm": torch.linalg.matrix_norm(h, ord=2).amax(),
        "row_residual": (h.sum(-1) - 1).abs().amax(),
        "column_residual": (h.sum(-2) - 1).abs().amax(),
        "orth_residual": frobenius(h.mT @ h - eye).amax(),
        "pre_entropy": entropy(pre.reshape(-1, n).double()).mean(),
        "post_entropy": entropy(post.reshape(-1, n).double()).mean(),
    }


@dataclass
class DynamicsReport:
    """Per-site metrics (each a (K,) tensor over the K sites, stream order) and the composite Amax gains."""

    site_names: list[str]
    learned: torch.Tensor  # (K,) bool: the site's H can move (``can_move``)
    sites: dict[str, torch.Tensor]
    amax_forward: float
    amax_backward: float

    def record(self, per_site: bool = True) -> dict[str, float]:
        """Flat ``{"hc/<metric>": value}`` (aggregates) and ``{"hc/<site>/<metric>": value}`` (per site) for the logs."""
        out = {f"{PREFIX}{k}": self.sites[k].mean().item() for k in MEAN_METRICS}
        out.update({f"{PREFIX}{k}": self.sites[k].max().item() for k in MAX_METRICS})
        moved = self.sites["h_dist_init"][self.learned]  # the least-moved site that can move
        out[f"{PREFIX}h_dist_init_min"] = moved.min().item() if moved.numel() else 0.0
        out[f"{PREFIX}amax_forward"], out[f"{PREFIX}amax_backward"] = self.amax_forward, self.amax_backward
        out[f"{PREFIX}amax"] = max(self.amax_forward, self.amax_backward)
        if per_site:
            for k, name in enumerate(self.site_names):
                out.update({f"{PREFIX}{name}/{metric}": self.sites[metric][k].item() for metric in SITE_METRICS})
        return out

    def unmoved_sites(self, threshold: float) -> list[str]:
        """Sites whose H can move (``can_move``) but is within ``threshold`` of its initialisation or of the identity."""
        near = torch.minimum(self.sites["h_dist_init"], self.sites["h_dist_identity"])
        stuck = (near < threshold) & self.learned
        return [name for name, s in zip(self.site_names, stuck.tolist()) if s]


def can_move(hc: HyperConnection, index: int) -> bool:
    """Whether site number ``index`` (in stream order) of a model can learn its H at all.

    Not the identity mixer (no logits), and not the first site of a mean-preserving mixer (Hᵀ1 = 1 for every θ):
    that site reads the expanded streams, n copies of the embedding, on which every such H gives the same
    output (Hᵀ X = X), so its logits get no gradient, by construction rather than degeneration.
    """
    return hc.mixer.num_logits > 0 and not (index == 0 and hc.mixer.mean_preserving)


def short_site_names(names: list[str]) -> list[str]:
    """Module names without their common dotted prefix: "model.layers.3.attn_hc" → "3.attn_hc"."""
    if len(names) < 2:
        return names
    common = os.path.commonprefix(names)
    cut = common.rfind(".") + 1
    return [name[cut:] for name in names]


@torch.no_grad()
def measure_dynamics(model: nn.Module, probe: dict, initial: dict[str, torch.Tensor] | None = None) -> DynamicsReport:
    """The H dynamics of ``model`` on the ``probe`` batch (model keyword arguments, e.g. ``input_ids``).

    ``initial`` maps site names to H_init (``initial_mixer``); computed here when not given. The model's
    train/eval mode is left as it was; the forward runs in eval mode (no dropout) under ``no_grad``.
    """
    records: list[tuple[str, HyperConnection, tuple]] = []
    # pre, post, H as ``coefficients`` defines them (the read itself returns u, not pre)
    observe = lambda name, hc, streams, _out: records.append((name, hc, hc.coefficients(streams)))  # noqa: E731
    training = model.training
    model.eval()
    try:
        with observe_reads(model, observe):
            model(**probe)
    finally:
        model.train(training)
    if not records:
        raise ValueError("the model read no streams on the probe batch")
    per_site: dict[str, list[torch.Tensor]] = {}
    for name, hc, (pre, post, mixer) in records:
        h_init = initial[name] if initial is not None else initial_mixer(hc)
        for key, value in site_metrics(pre, post, mixer, h_init.to(mixer.device)).items():
            per_site.setdefault(key, []).append(value)
        for key, value in zip(("alpha_pre", "alpha_post", "alpha_res"), hc.alpha.detach().double()):
            per_site.setdefault(key, []).append(value)
    gains = gain_report(stack_site_mixers([mixer for *_, (_, _, mixer) in records]))
    return DynamicsReport(
        site_names=short_site_names([name for name, *_ in records]),
        learned=torch.tensor([can_move(hc, k) for k, (_, hc, _) in enumerate(records)]),
        sites={key: torch.stack(values).cpu() for key, values in per_site.items()},
        amax_forward=gains.composite_forward.max().item(),
        amax_backward=gains.composite_backward.max().item(),
    )


class DynamicsMonitor:
    """``monitor(model, step) → record``: the H dynamics on a fixed probe batch, for ``train_loop``'s log records.

    At the first call at or after ``degeneration_step`` it warns (``IdentityDegenerationWarning``, once) if any
    learned mixer is within ``degeneration_threshold`` of its initialisation or of I (``unmoved_sites``), naming the
    sites; the record then carries ``hc/unmoved_sites``, the count. ``degeneration_step=None`` disables the check.
    """

    def __init__(self, model: nn.Module, probe: dict, *, per_site: bool = True, degeneration_threshold: float = 0.01,
                 degeneration_step: int | None = 200):  # fmt: skip
        if degeneration_threshold < 0:
            raise ValueError(f"degeneration_threshold must be >= 0, got {degeneration_threshold}")
        self.initial = {name: initial_mixer(hc) for name, hc in hyper_connection_sites(model)}
        self.probe, self.per_site = probe, per_site
        self.threshold, self.step = degeneration_threshold, degeneration_step
        self.checked = False

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        report = measure_dynamics(model, self.probe, self.initial)
        record = report.record(self.per_site)
        if self.step is not None and step >= self.step and not self.checked:
            self.checked = True
            unmoved = report.unmoved_sites(self.threshold)
            record[f"{PREFIX}unmoved_sites"] = len(unmoved)
            if unmoved:
                warnings.warn(degeneration_message(unmoved, len(report.site_names), step, self.threshold),
                              IdentityDegenerationWarning, stacklevel=2)  # fmt: skip
        return record


def degeneration_message(unmoved: list[str], num_sites: int, step: int, threshold: float) -> str:
    shown = ", ".join(unmoved[:8]) + (f", … ({len(unmoved) - 8} more)" if len(unmoved) > 8 else "")
    return (
        f"identity degeneration: after {step} steps H is within {threshold:g} of its initialisation or of the identity "
        f"(min(‖H − H_init‖_F, ‖H − I‖_F), mean over the probe tokens) at {len(unmoved)} of {num_sites} sites: {shown}. "
        "If the hyper-connections learn too slowly, raise their learning rate (--hc_lr_scale) or lower their weight "
        "decay (--hc_weight_decay); docs/mixer_study.md discusses when the identity is simply what training prefers."
    )


__all__ = [
    "DynamicsMonitor",
    "DynamicsReport",
    "IdentityDegenerationWarning",
    "initial_mixer",
    "measure_dynamics",
    "site_metrics",
]
