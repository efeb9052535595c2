"""The n-stream residual: expand, one hyper-connection per branch, collapse (SPEC §1, §3).

Notation key: B batch, T tokens, n streams, C hidden size, r the mixer's logit count.
X ∈ R^{B×T×n×C} are the residual streams; coefficients are always computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mixers import Mixer, _logit

# How much of a branch's read weight sits on its home stream at initialisation (symmetry breaking):
# pre = (1 − ρ)/n · 1 + ρ · e_home, which still sums to 1.
HOME_STREAM_WEIGHT = 0.5


def rms_norm_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last axis, in float32 (DeepSeek-V4's ``UnweightedRMSNorm``)."""
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def expand_streams(hidden: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Every stream starts as a copy of the token embedding: (B, T, C) → (B, T, n, C)."""
    return hidden.unsqueeze(-2).expand(*hidden.shape[:-1], num_streams, hidden.shape[-1])


def collapse_streams(streams: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """u = Σ_i w_i X_i: (…, n, C), (…, n) → (…, C), accumulated in float32, returned in the streams' dtype."""
    return torch.einsum("...n,...nc->...c", weights.float(), streams.float()).to(streams.dtype)


def update_streams(streams: torch.Tensor, mixer: torch.Tensor, post: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """X' = Hᵀ X + post ⊗ f, i.e. X'_t = Σ_s H[s, t] X_s + post_t f (SPEC §1 orientation)."""
    dtype = streams.dtype
    mixed = torch.matmul(mixer.to(dtype).transpose(-1, -2), streams)  # (B, T, n, C)
    return mixed + post.to(dtype).unsqueeze(-1) * branch.unsqueeze(-2)


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
    ):
        super().__init__()
        n, r = mixer.num_streams, mixer.num_logits
        self.num_streams, self.mixer, self.home_stream = n, mixer, home_stream % n
        self.split_sizes = (n, n, r)
        self.alpha_init, self.pre_eps, self.norm_eps = alpha_init, pre_eps, norm_eps
        self.phi = nn.Parameter(torch.empty(2 * n + r, n * hidden_size)) if dynamic else None
        self.bias = nn.Parameter(torch.empty(2 * n + r))
        self.alpha = nn.Parameter(torch.empty(3))
        self.reset_parameters()

    def initial_bias(self) -> torch.Tensor:
        n = self.num_streams
        pre = torch.full((n,), (1 - HOME_STREAM_WEIGHT) / n)
        pre[self.home_stream] += HOME_STREAM_WEIGHT
        pre_bias = torch.tensor([_logit(p) for p in pre.tolist()])
        return torch.cat([pre_bias, torch.zeros(n), self.mixer.init_logits()])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.phi is not None:
            self.phi.zero_()
        self.bias.copy_(self.initial_bias())
        self.alpha.fill_(self.alpha_init)

    def coefficients(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre (…, n), post (…, n), H (…, n, n) in float32; static coefficients have no batch axes."""
        n = self.num_streams
        if self.phi is None:
            z = self.bias.float()
        else:
            x = rms_norm_unweighted(streams.flatten(-2), self.norm_eps)  # (B, T, nC)
            z = F.linear(x, self.phi.float())  # (B, T, 2n + r)
            scale = torch.cat([a.expand(size) for a, size in zip(self.alpha.float(), self.split_sizes)])
            z = z * scale + self.bias.float()
        z_pre, z_post, z_res = z.split(self.split_sizes, dim=-1)
        pre = torch.sigmoid(z_pre) + self.pre_eps
        post = 2 * torch.sigmoid(z_post)
        return pre, post, self.mixer(z_res)

    def read(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Branch input u = Σ preᵢ Xᵢ (B, T, C), plus the (post, H) that ``write`` needs."""
        pre, post, mixer = self.coefficients(streams)
        return collapse_streams(streams, pre), post, mixer

    def write(self, streams: torch.Tensor, branch: torch.Tensor, post: torch.Tensor, mixer: torch.Tensor) -> torch.Tensor:
        """X' = Hᵀ X + post ⊗ f."""
        return update_streams(streams, mixer, post, branch)

    def extra_repr(self) -> str:
        return f"num_streams={self.num_streams}, home_stream={self.home_stream}, dynamic={self.phi is not None}"


class StreamCollapse(nn.Module):
    """h = Σᵢ wᵢ Xᵢ before the final norm: w = σ(α x̃ Φᵀ + b) (+ eps) — transformers' ``DeepseekV4HyperHead`` —
    or the fixed mean w = 1/n. At init (Φ = 0, b = logit(1/n)) both give the mean, i.e. the plain residual."""

    def __init__(self, hidden_size: int, num_streams: int, *, learned: bool = True, alpha_init: float = 0.01,
                 pre_eps: float = 0.0, norm_eps: float = 1e-6):  # fmt: skip
        super().__init__()
        self.num_streams, self.alpha_init, self.pre_eps, self.norm_eps = num_streams, alpha_init, pre_eps, norm_eps
        if learned:
            self.phi = nn.Parameter(torch.empty(num_streams, num_streams * hidden_size))
            self.bias = nn.Parameter(torch.empty(num_streams))
            self.alpha = nn.Parameter(torch.empty(1))
            self.reset_parameters()
        else:
            self.phi = None

    @property
    def initial_bias(self) -> float:
        return _logit(1 / self.num_streams)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.phi is not None:
            self.phi.zero_()
            self.bias.fill_(self.initial_bias)
            self.alpha.fill_(self.alpha_init)

    def weights(self, streams: torch.Tensor) -> torch.Tensor:
        """w (…, n) in float32."""
        if self.phi is None:
            return streams.new_full((self.num_streams,), 1 / self.num_streams, dtype=torch.float32)
        x = rms_norm_unweighted(streams.flatten(-2), self.norm_eps)
        z = F.linear(x, self.phi.float()) * self.alpha.float() + self.bias.float()
        return torch.sigmoid(z) + self.pre_eps

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return collapse_streams(streams, self.weights(streams))
