"""Amax gain of the residual mixers (SPEC §4, mHC's stability plot), per site and composite over depth.

The streams see the sites in order 1, 2, …, K and X_K = H_Kᵀ ⋯ H_1ᵀ X_0 = (H_1 H_2 ⋯ H_K)ᵀ X_0 (SPEC §1), so the
composite mixer of the first k sites is P_k = H_1 H_2 ⋯ H_k, and

    forward gain  = max_i Σ_j |P_ij|   (max row sum),     backward gain = max_j Σ_i |P_ij|   (max column sum).

Mixers are input-dependent, so H is recorded per token at every site while the model runs on the given
inputs, and each gain is the maximum over tokens (composites are formed token by token).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..models.hyper_connection import HyperConnection


@dataclass
class GainReport:
    """Gains of sites 1..K in stream order: per site and composite over sites 1..k, forward and backward."""

    site_names: list[str]
    site_forward: torch.Tensor  # (K,)
    site_backward: torch.Tensor  # (K,)
    composite_forward: torch.Tensor  # (K,)
    composite_backward: torch.Tensor  # (K,)


def forward_gain(p: torch.Tensor) -> torch.Tensor:
    """max row sum of |P| (…, n, n) → (…)."""
    return p.abs().sum(-1).amax(-1)


def backward_gain(p: torch.Tensor) -> torch.Tensor:
    """max column sum of |P| (…, n, n) → (…)."""
    return p.abs().sum(-2).amax(-1)


def composite_mixers(mixers: torch.Tensor) -> torch.Tensor:
    """P_k = H_1 ⋯ H_k for every k, accumulated in float64: (K, …, n, n) → (K, …, n, n)."""
    products, running = [], None
    for h in mixers.double():
        running = h if running is None else running @ h
        products.append(running)
    return torch.stack(products)


def gain_report(mixers: torch.Tensor, site_names: list[str] | None = None) -> GainReport:
    """Gains from the recorded mixers H (K, tokens, n, n), maxima over tokens."""
    if mixers.dim() != 4 or mixers.shape[-1] != mixers.shape[-2]:
        raise ValueError(f"mixers must have shape (sites, tokens, n, n), got {tuple(mixers.shape)}")
    composite = composite_mixers(mixers)
    names = site_names or [f"site {k}" for k in range(mixers.shape[0])]
    return GainReport(
        names,
        forward_gain(mixers.double()).amax(-1),
        backward_gain(mixers.double()).amax(-1),
        forward_gain(composite).amax(-1),
        backward_gain(composite).amax(-1),
    )


def hyper_connection_sites(model: nn.Module) -> list[tuple[str, HyperConnection]]:
    """(module name, module) of every ``HyperConnection`` in ``model``, in stream order; ValueError if none."""
    sites = [(name, m) for name, m in model.named_modules() if isinstance(m, HyperConnection)]
    if not sites:
        raise ValueError(
            f"{type(model).__name__} has no HyperConnection modules, so it is not a JPmHC model; convert it first "
            "(hf-jpmhc convert llama SRC OUT)"
        )
    return sites


@contextmanager
def observe_reads(model: nn.Module, observe: Callable[[str, HyperConnection, torch.Tensor, tuple], None]):
    """Call ``observe(site name, hyper-connection, streams X, (u, post, H))`` each time a ``HyperConnection`` of
    ``model`` reads the streams, for the duration of the block.

    Wraps each hyper-connection's ``read`` — an instance attribute, removed on exit — so what is observed is what
    that layer computed from the streams it saw. A ``read`` that is already an instance attribute (FSDP2 registers
    its forward methods so) is the one called, and it is restored on exit.
    """
    sites = hyper_connection_sites(model)
    own = {name: hc.__dict__["read"] for name, hc in sites if "read" in hc.__dict__}

    def observed(name: str, hc: HyperConnection):
        read_streams = hc.read

        def read(streams: torch.Tensor):
            out = read_streams(streams)
            observe(name, hc, streams, out)
            return out

        return read

    try:
        for name, hc in sites:
            hc.read = observed(name, hc)
        yield
    finally:
        for name, hc in sites:
            if name in own:
                hc.read = own[name]
            else:
                hc.__dict__.pop("read", None)


@contextmanager
def record_mixers(model: nn.Module):
    """Record (site name, H) of every ``HyperConnection`` in ``model`` each time it reads the streams
    (``observe_reads``). Yields the list it appends to."""
    records: list[tuple[str, torch.Tensor]] = []
    with observe_reads(model, lambda name, _hc, _streams, out: records.append((name, out[2].detach()))):
        yield records


@torch.no_grad()
def model_gain(model: nn.Module, **inputs) -> GainReport:
    """Amax gains of a JPmHC model on ``inputs`` (e.g. ``input_ids``, ``attention_mask``), max over tokens.

    Static (``dynamic=False``) mixers are the same for every token. Padding tokens count too: pass only
    real tokens if that matters.
    """
    with record_mixers(model) as records:
        model(**inputs)
    if not records:
        raise ValueError("the model read no streams on these inputs")
    return gain_report(stack_site_mixers([h for _, h in records]), [name for name, *_ in records])


def stack_site_mixers(mixers: list[torch.Tensor]) -> torch.Tensor:
    """The sites' H, each (…, n, n) — per token, or (n, n) for static coefficients — as (K, tokens, n, n)."""
    n = mixers[0].shape[-1]
    flat = [h.reshape(-1, n, n) for h in mixers]
    tokens = max(h.shape[0] for h in flat)
    return torch.stack([h.expand(tokens, n, n) for h in flat])
