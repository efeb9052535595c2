"""The n-stream residual: expand, one hyper-connection per branch, collapse (SPEC §1, §3).

Notation key: B batch, T tokens, n streams, C hidden size, r the mixer's logit count.
X ∈ R^{B×T×n×C} are the residual streams; coefficients are always computed in float32. How the passes over the
streams run (torch, compiled, Triton) is decided in one place, ``hc_kernels.kernels_for``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .hc_kernels import StreamRecompute, kernels_for, prepare_kernels
from .mixers import Mixer
from .stream_passes import activate_coefficients, dynamic_coefficients

# The modules that hold a model's hyper-connection parameters (each decoder layer's two sites and the head):
# kept in float32, new after a conversion, trained beside LoRA adapters.
HYPER_CONNECTION_MODULES = ("attn_hc", "mlp_hc", "stream_collapse")

# How much of a branch's read weight sits on its home stream at initialisation (symmetry breaking):
# pre = (1 − ρ)/n · 1 + ρ · e_home, which still sums to 1.
HOME_STREAM_WEIGHT = 0.5


def is_hyper_connection_parameter(name: str) -> bool:
    """Whether the parameter ``name`` (as in ``named_parameters``) belongs to a hyper-connection module."""
    return any(part in HYPER_CONNECTION_MODULES for part in name.split(".")[:-1])


def clipped_logit(p: float) -> float:
    """σ⁻¹(p), with p clipped into [1e-4, 1 − 1e-4] so that saturated targets stay finite."""
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def expand_streams(hidden: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Every stream starts as a copy of the token embedding: (B, T, C) → (B, T, n, C)."""
    return hidden.unsqueeze(-2).expand(*hidden.shape[:-1], num_streams, hidden.shape[-1])


class HyperConnection(nn.Module):
    r"""One hyper-connection around a branch F (attention or MLP), SPEC §1:

                          X  (B, T, n, C)
              ┌───────────────┼──────────────────────────────┐
              │     x̃ = RMSNorm(flatten X)  (fp32)           │
              │     z = x̃ Φᵀ · α + b  ──► pre, post, H       │
              │               │                              │
      u = Σ preᵢ Xᵢ   (B, T, C)                        Hᵀ X  (B, T, n, C)
              │                                              │
      f = F(norm(u))  (B, T, C)                              │
              │                                              │
              └──────────── post ⊗ f ──────────► ( + ) ◄─────┘
                                                   │
                                        X' = Hᵀ X + post ⊗ f

    with pre = σ(α_pre z_pre + b_pre) (+ eps), post = 2σ(α_post z_post + b_post), H = mixer(α_res z_res + b_res).

    Parameters (packed like transformers' ``DeepseekV4HyperConnection``: ``fn``, ``base``, ``scale``):
        phi   (2n + r, nC)  the dynamic projection Φ, zero at init; absent when ``dynamic=False``
        bias  (2n + r,)     b_pre, b_post, b_res
        alpha (3,)          α_pre, α_post, α_res

    Initialisation (SPEC §3): Φ = 0, b_post = 0 (post = 1), b_pre puts weight ρ on the home stream and
    sums to 1, b_res = the mixer's identity logits. While the streams are equal and Hᵀ1 = 1, every
    stream equals the plain model's residual, so conversion preserves the function exactly.
    """

    def __init__(
        self,
        hidden_size: int,
        mixer: Mixer,
        *,
        home_stream: int = 0,
        dynamic: bool = True,
        alpha_init: float = 0.01,
        pre_eps: float = 0.0,
        norm_eps: float = 1e-6,
        kernel_backend: str = "auto",
    ):
        super().__init__()
        prepare_kernels(kernel_backend)
        n, r = mixer.num_streams, mixer.num_logits
        self.num_streams, self.mixer, self.home_stream, self.kernel_backend = n, mixer, home_stream % n, kernel_backend
        self.split_sizes = (n, n, r)
        self.alpha_init, self.pre_eps, self.norm_eps = alpha_init, pre_eps, norm_eps
        self.phi = nn.Parameter(torch.empty(2 * n + r, n * hidden_size)) if dynamic else None
        self.bias = nn.Parameter(torch.empty(2 * n + r))
        self.alpha = nn.Parameter(torch.empty(3))
        self.reset_parameters()

    def initial_bias(self) -> torch.Tensor:
        n = self.num_streams
        # Python floats, not a tensor: from_pretrained builds the model on the meta device, where .tolist() fails.
        pre = [(1 - HOME_STREAM_WEIGHT) / n + HOME_STREAM_WEIGHT * (s == self.home_stream) for s in range(n)]
        pre_bias = torch.tensor([clipped_logit(p) for p in pre])
        return torch.cat([pre_bias, torch.zeros(n), self.mixer.init_logits()])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.phi is not None:
            self.phi.zero_()
        self.bias.copy_(self.initial_bias())
        self.alpha.fill_(self.alpha_init)

    def read(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Branch input u = Σ preᵢ Xᵢ (B, T, C), plus the (post, H) that ``write`` needs."""
        return kernels_for(self.kernel_backend, streams).read(self, streams)

    def write(self, streams: torch.Tensor, branch: torch.Tensor, post: torch.Tensor, mixer: torch.Tensor) -> torch.Tensor:
        """X' = Hᵀ X + post ⊗ f."""
        return kernels_for(self.kernel_backend, streams).write(self, streams, branch, post, mixer)

    def coefficients(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre (…, n), post (…, n), H (…, n, n) in float32, by the torch code (for diagnostics; the model reads
        through ``read``); static coefficients have no batch axes."""
        if self.phi is None:
            pre, post, z_res = activate_coefficients(self.bias.float(), self.split_sizes, self.pre_eps)
        else:
            args = (self.phi, self.alpha, self.bias, self.split_sizes, self.pre_eps, self.norm_eps)
            pre, post, z_res = dynamic_coefficients(streams, *args)
        return pre, post, self.mixer(z_res)

    def extra_repr(self) -> str:
        return (f"num_streams={self.num_streams}, home_stream={self.home_stream}, dynamic={self.phi is not None}, "
                f"kernel_backend={self.kernel_backend!r}")  # fmt: skip


class StreamCollapse(nn.Module):
    """h = Σᵢ wᵢ Xᵢ before the final norm: w = σ(α x̃ Φᵀ + b) (+ eps) — transformers' ``DeepseekV4HyperHead`` —
    or the fixed mean w = 1/n. At init (Φ = 0, b = logit(1/n)) both give the mean, i.e. the plain residual."""

    def __init__(self, hidden_size: int, num_streams: int, *, learned: bool = True, alpha_init: float = 0.01,
                 pre_eps: float = 0.0, norm_eps: float = 1e-6, kernel_backend: str = "auto"):  # fmt: skip
        super().__init__()
        prepare_kernels(kernel_backend)
        self.kernel_backend = kernel_backend
        self.num_streams, self.alpha_init, self.pre_eps, self.norm_eps = num_streams, alpha_init, pre_eps, norm_eps
        self.split_sizes = (num_streams, 0, 0)  # the weights w are a read's pre segment; there is no post or H
        if learned:
            self.phi = nn.Parameter(torch.empty(num_streams, num_streams * hidden_size))
            self.bias = nn.Parameter(torch.empty(num_streams))
            self.alpha = nn.Parameter(torch.empty(1))
            self.reset_parameters()
        else:
            self.phi = None

    @property
    def initial_bias(self) -> float:
        return clipped_logit(1 / self.num_streams)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.phi is not None:
            self.phi.zero_()
            self.bias.fill_(self.initial_bias)
            self.alpha.fill_(self.alpha_init)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return kernels_for(self.kernel_backend, streams).collapse(self, streams)


class HyperConnectedLayer(GradientCheckpointingLayer):
    """A transformer layer whose residual is the streams, read and written by its hyper-connections.

    ``hc_recompute`` (mHC's recomputation) is its policy, applied around the whole forward (``StreamRecompute``):
    each site's read is recomputed in the backward and the mid-layer streams are rebuilt, so the layer stores its
    streams once, as its input. Not under gradient checkpointing (the whole layer is recomputed then) and not
    while compiling (the partitioner chooses what to save).
    """

    hc_recompute: bool = False

    def __call__(self, *args, **kwargs):
        checkpointed = self.gradient_checkpointing and self.training
        if not self.hc_recompute or checkpointed or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().__call__(*args, **kwargs)
        with StreamRecompute():
            return super().__call__(*args, **kwargs)
