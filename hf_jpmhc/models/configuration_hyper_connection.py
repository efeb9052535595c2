"""The hyper-connection fields shared by every JPmHC config (LM and ViT): one definition, one validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .mixers import SinkhornMixer, StiefelMixer, validate_mixer

KERNEL_BACKENDS = ("auto", "torch", "triton")  # hf_jpmhc.ops
HC_KERNEL_BACKENDS = (*KERNEL_BACKENDS, "compiled")  # models: "compiled" is the torch path with torch.compile'd passes
COLLAPSES = ("learned", "mean")
BOOLEAN_FIELDS = ("dynamic", "hc_recompute")
INTEGER_MINIMUMS = {"num_streams": 1, "sinkhorn_iters": 1, "sinkhorn_newton_steps": 0, "cayley_iters": 1}
NUMBER_MINIMUMS = {"sinkhorn_eps": 0.0, "hc_pre_eps": 0.0, "hc_alpha_init": 0.0}


@dataclass(kw_only=True)
class HyperConnectionConfig:
    """Fields of the n-stream residual (SPEC §1–§3). Mixed into ``JPmHCConfig`` and ``JPmHCViTConfig``.

    num_streams:           n, the number of residual streams (n = 1 with ``mixer="identity"`` is a plain model).
    mixer:                 the manifold of H: identity, unconstrained (hc), sinkhorn (mhc), permutation (mhc-lite),
                           kronecker (kromhc), spectral (shc), transport (tbp), stiefel (cayley, jpmhc), grassmann.
    dynamic:               input-dependent coefficients through Φ (mHC); False keeps only the static biases.
    sinkhorn_iters:        Sinkhorn–Knopp rounds (mHC uses 20).
    sinkhorn_newton_steps: Newton steps polishing the Sinkhorn result to float precision (0 = plain SK).
    sinkhorn_backward:     "implicit" (saves only H, JPmHC) or "unrolled" (autograd through every round).
    sinkhorn_eps:          DeepSeek-V4's additive eps (probability-domain SK, no Newton); 0 = log-domain SK.
    cayley_method:         "solve" (exact for any θ) or "iterative" (matmul fixed point, needs ‖A‖₂ < 2).
    cayley_iters:          fixed-point steps of the iterative Cayley transform.
    grassmann_rank:        p of the rank-p Grassmann mixer, 1..n−1 (None = n−1).
    hc_alpha_init:         initial α_pre, α_post, α_res: small, so the dynamic part starts as a perturbation.
    hc_pre_eps:            added to the read weights, pre = σ(·) + eps (DeepSeek-V4 convention; 0 here).
    hc_collapse:           "learned" (σ head, DeepSeek-V4's HyperHead) or "mean" (fixed average of the streams).
    kernel_backend:        "auto" (Triton on CUDA, torch elsewhere), "torch", "triton", or "compiled": the torch
                           path with its per-token passes (and, without autograd, each whole read and write) as
                           hf_jpmhc's C++ loops or torch.compile'd — the fast CPU path, for training and for
                           generation (needs a C++ compiler; the first steps compile, ≈ 1 min).
    hc_recompute:          recompute the coefficients, mixers and mid-layer streams in the backward: per layer the
                           streams are stored once, as its input (mHC's recomputation).
    """

    num_streams: int = 4
    mixer: str = "stiefel"
    dynamic: bool = True
    sinkhorn_iters: int = 20
    sinkhorn_newton_steps: int = 8
    sinkhorn_backward: str = "implicit"
    sinkhorn_eps: float = 0.0
    cayley_method: str = "solve"
    cayley_iters: int = 12
    grassmann_rank: int | None = None
    hc_alpha_init: float = 0.01
    hc_pre_eps: float = 0.0
    hc_collapse: str = "learned"
    kernel_backend: str = "auto"
    hc_recompute: bool = False

    def validate_hyper_connection(self) -> None:
        """Raise ValueError naming the field and what it accepts; canonicalise the mixer alias."""
        for field in BOOLEAN_FIELDS:
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field} must be True or False, got {getattr(self, field)!r}")
        for field, minimum in INTEGER_MINIMUMS.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")
        for field, minimum in NUMBER_MINIMUMS.items():
            value = getattr(self, field)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not is_number or not math.isfinite(value) or value < minimum:
                raise ValueError(f"{field} must be a finite number >= {minimum}, got {value!r}")
        if self.hc_alpha_init == 0:
            raise ValueError("hc_alpha_init must be > 0 (at 0 the dynamic projection Φ never gets a gradient), got 0")
        rank = self.grassmann_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
            raise ValueError(f"grassmann_rank must be None or an integer in 1..num_streams-1, got {rank!r}")
        self.mixer = validate_mixer(self.mixer, self.num_streams, self.grassmann_rank)
        check_choice("sinkhorn_backward", self.sinkhorn_backward, SinkhornMixer.BACKWARDS)
        check_choice("cayley_method", self.cayley_method, StiefelMixer.METHODS)
        check_choice("hc_collapse", self.hc_collapse, COLLAPSES)
        check_choice("kernel_backend", self.kernel_backend, HC_KERNEL_BACKENDS)
        if self.sinkhorn_eps > 0 and self.sinkhorn_backward == "implicit":
            raise ValueError(
                "sinkhorn_eps > 0 (DeepSeek-V4's probability-domain Sinkhorn) has no exact fixed point for the "
                "implicit backward; set sinkhorn_backward='unrolled' or sinkhorn_eps=0"
            )
        if self.grassmann_rank is not None and self.mixer != "grassmann":
            raise ValueError(f"grassmann_rank only applies to mixer='grassmann', got mixer={self.mixer!r}")

    @property
    def mixer_options(self) -> dict:
        """The keyword arguments of ``build_mixer`` for this config."""
        return {
            "sinkhorn_iters": self.sinkhorn_iters,
            "sinkhorn_backward": self.sinkhorn_backward,
            "sinkhorn_eps": self.sinkhorn_eps,
            "sinkhorn_newton_steps": self.sinkhorn_newton_steps,
            "cayley_method": self.cayley_method,
            "cayley_iters": self.cayley_iters,
            "grassmann_rank": self.grassmann_rank,
        }


def check_choice(field: str, value, choices) -> None:
    """ValueError naming ``field`` and its allowed values unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{field} must be one of {', '.join(map(repr, choices))}, got {value!r}")
