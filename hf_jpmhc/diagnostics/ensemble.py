"""The random ensemble the spectrum predictor is stated for: a hyper-connected stack at initialisation.

One "randomly initialised model" of the ensemble, for a mixer, n streams, depth L and branch gain g:

* 2L hyper-connection sites (an attention site and an MLP site per decoder layer), each built by the LM's
  own ``build_hyper_connection`` — same home streams, same pre/post initialisation. At init Φ = 0, so
  the coefficients do not depend on the input: the sites are built static (``dynamic=False``), which is
  the same function and computes each mixer once instead of once per token;
* the mixer logits b_res drawn i.i.d. N(0, s²) (``logit_std = s``), so that H is a random point of the
  manifold; ``logit_std=None`` keeps them at the mixer's init (H ≈ I for most mixers);
* each branch a linear map W_l ∈ R^{C×C} with i.i.d. N(0, g²/C) entries (``branch_gain = g``): the model
  of a branch Jacobian at init. There is no norm in the branch: a pre-norm makes the Jacobian scale
  with 1/rms(u), which depends on the forward pass (see docs/free_probability.md).

Per token, site l maps the streams X (n, C) to X' = H_lᵀ X + post_l (pre_lᵀ X) W_lᵀ (SPEC §1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.configuration_jpmhc import JPmHCConfig
from ..models.hyper_connection import collapse_streams
from ..models.modeling_jpmhc import build_hyper_connection

# Default logit scale of the random-mixer ensemble. The unconstrained mixer is H = I + θ: with s = 1 its
# product over 128 sites is ~1e40 and the average over draws is carried by rare draws; a small scale
# keeps the ensemble mean meaningful and still shows the gain growing with depth.
DEFAULT_LOGIT_STD = {"unconstrained": 0.02}
DEFAULT_BRANCH_GAIN = 0.1


@dataclass
class RandomHyperConnectionEnsemble:
    """mixer, n, depth L (decoder layers, 2L sites), hidden size C, branch gain g, mixer-logit scale s."""

    mixer: str
    num_streams: int = 4
    depth: int = 8
    hidden_size: int = 64
    branch_gain: float = DEFAULT_BRANCH_GAIN
    logit_std: float | None = 1.0
    grassmann_rank: int | None = None

    def __post_init__(self):
        for field in ("num_streams", "depth", "hidden_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if not self.branch_gain >= 0:
            raise ValueError(f"branch_gain must be >= 0, got {self.branch_gain}")
        if self.logit_std is not None and not self.logit_std >= 0:
            raise ValueError(f"logit_std must be >= 0 or None (mixers at their init), got {self.logit_std}")
        self.config = JPmHCConfig(
            vocab_size=8,
            hidden_size=self.hidden_size,
            intermediate_size=self.hidden_size,
            num_hidden_layers=self.depth,
            num_attention_heads=1,
            num_key_value_heads=1,
            num_streams=self.num_streams,
            mixer=self.mixer,
            grassmann_rank=self.grassmann_rank,
            dynamic=False,
        )
        self.mixer = self.config.mixer  # canonical name

    @classmethod
    def with_default_scale(cls, mixer: str, **kwargs) -> RandomHyperConnectionEnsemble:
        """The ensemble with this mixer's default logit scale (``DEFAULT_LOGIT_STD``, else 1)."""
        ensemble = cls(mixer, **kwargs)
        ensemble.logit_std = DEFAULT_LOGIT_STD.get(ensemble.mixer, 1.0)
        return ensemble

    @property
    def num_sites(self) -> int:
        return 2 * self.depth

    def sample_sites(self, generator: torch.Generator) -> nn.ModuleList:
        """2L static hyper-connections at init, with random mixer logits if ``logit_std`` is set."""
        sites = nn.ModuleList(
            build_hyper_connection(self.config, site, self.config.rms_norm_eps) for site in range(self.num_sites)
        )
        if self.logit_std is not None:
            with torch.no_grad():
                for hc in sites:
                    r = hc.mixer.num_logits
                    if r:
                        hc.bias[-r:] = self.logit_std * torch.randn(r, generator=generator)
        return sites

    def sample_model(self, generator: torch.Generator) -> HyperConnectedLinearStack:
        """One randomly initialised model of the ensemble (streams in float64, coefficients in float32)."""
        return HyperConnectedLinearStack(self.sample_sites(generator), self.hidden_size, self.branch_gain, generator)

    def sample_coefficients(self, num_draws: int, generator: torch.Generator) -> SiteCoefficients:
        """pre, post, H of every site for ``num_draws`` independent models — the n×n part only.

        pre and post do not depend on the draw; H = mixer(b_res) runs batched over the draws, through
        the same mixer modules as ``sample_sites`` builds.
        """
        sites = self.sample_sites(generator)
        pre, post, mixer = site_coefficients(sites)  # (K, n), (K, n), (K, n, n)
        if self.logit_std is not None:
            with torch.no_grad():
                mixer = torch.stack([
                    hc.mixer(self.logit_std * torch.randn(num_draws, hc.mixer.num_logits, generator=generator))
                    for hc in sites
                ], dim=1)  # fmt: skip
        pre, post = pre.expand(num_draws, *pre.shape), post.expand(num_draws, *post.shape)
        return SiteCoefficients(pre, post, mixer if mixer.dim() == 4 else mixer.expand(num_draws, *mixer.shape))


@dataclass
class SiteCoefficients:
    """Per-site coefficients: pre (…, K, n), post (…, K, n), H (…, K, n, n) in float32, sites in stream order."""

    pre: torch.Tensor
    post: torch.Tensor
    mixer: torch.Tensor


@torch.no_grad()
def site_coefficients(sites: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pre, post, H) of static hyper-connections (``dynamic=False``), stacked over the sites."""
    pres, posts, mixers = [], [], []
    for hc in sites:
        if hc.phi is not None:
            raise ValueError("site_coefficients needs static hyper-connections (dynamic=False)")
        pre, post, mixer = hc.coefficients(torch.zeros(hc.num_streams, 1))
        pres.append(pre), posts.append(post), mixers.append(mixer)
    return torch.stack(pres), torch.stack(posts), torch.stack(mixers)


class HyperConnectedLinearStack(nn.Module):
    """2L static hyper-connections, each around a linear branch f = W_l u (W_l ~ N(0, g²/C)): the ensemble's model.

    The coefficients (pre, post, H) come from ``HyperConnection.coefficients`` once, at construction (they
    do not depend on the input); ``forward`` maps streams X_0 (…, n, C) to X_L with the stream ops of
    ``hyper_connection.py``: u = Σ preᵢ Xᵢ, X' = Hᵀ X + post ⊗ W u.
    """

    def __init__(self, sites: nn.ModuleList, hidden: int, branch_gain: float, generator: torch.Generator):
        super().__init__()
        self.sites = sites
        pre, post, mixer = site_coefficients(sites)
        self.register_buffer("pre", pre)  # (K, n)
        self.register_buffer("post", post)  # (K, n)
        self.register_buffer("mixer", mixer)  # (K, n, n)
        weights = torch.randn(len(sites), hidden, hidden, generator=generator, dtype=torch.float64)
        self.register_buffer("branch_weights", weights * branch_gain / hidden**0.5)  # (K, C, C)

    def coefficients(self) -> SiteCoefficients:
        return SiteCoefficients(self.pre, self.post, self.mixer)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        for hc, pre, post, mixer, weight in zip(self.sites, self.pre, self.post, self.mixer, self.branch_weights):
            u = collapse_streams(streams, pre)  # (…, C)
            streams = hc.write(streams, u @ weight.T.to(u.dtype), post, mixer)
        return streams
