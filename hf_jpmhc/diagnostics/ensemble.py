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
from ..models.stream_passes import collapse_streams
from ..models.modeling_jpmhc import JPmHCModel, build_hyper_connection

# Default logit scale of the random-mixer ensemble. The unconstrained mixer is H = I + θ: with s = 1 its
# product over 128 sites is ~1e40 and the average over draws is carried by rare draws; a small scale
# keeps the ensemble mean meaningful and still shows the gain growing with depth.
DEFAULT_LOGIT_STD = {"unconstrained": 0.02}
DEFAULT_BRANCH_GAIN = 0.1


@dataclass
class RandomMixerEnsemble:
    """What both ensembles share: mixer, n, depth L (decoder layers, 2L sites), hidden size C, mixer-logit scale s."""

    mixer: str
    num_streams: int = 4
    depth: int = 8
    hidden_size: int = 64
    logit_std: float | None = 1.0
    grassmann_rank: int | None = None

    positive_fields = ("num_streams", "depth", "hidden_size")  # not a dataclass field: no annotation

    def __post_init__(self):
        for field in self.positive_fields:
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if self.logit_std is not None and not self.logit_std >= 0:
            raise ValueError(f"logit_std must be >= 0 or None (mixers at their init), got {self.logit_std}")

    @classmethod
    def with_default_scale(cls, mixer: str, **kwargs):
        """The ensemble with this mixer's default logit scale (``DEFAULT_LOGIT_STD``, else 1)."""
        ensemble = cls(mixer, **kwargs)
        ensemble.logit_std = DEFAULT_LOGIT_STD.get(ensemble.mixer, 1.0)
        return ensemble

    @property
    def num_sites(self) -> int:
        return 2 * self.depth


@dataclass
class RandomHyperConnectionEnsemble(RandomMixerEnsemble):
    """Stacks of static hyper-connections with Gaussian linear branches of gain g (``HyperConnectedLinearStack``)."""

    branch_gain: float = DEFAULT_BRANCH_GAIN

    def __post_init__(self):
        super().__post_init__()
        if not self.branch_gain >= 0:
            raise ValueError(f"branch_gain must be >= 0, got {self.branch_gain}")
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

    def sample_sites(self, generator: torch.Generator) -> nn.ModuleList:
        """2L static hyper-connections at init, with random mixer logits if ``logit_std`` is set."""
        sites = nn.ModuleList(
            build_hyper_connection(self.config, site, self.config.rms_norm_eps) for site in range(self.num_sites)
        )
        randomize_mixer_logits(sites, self.logit_std, generator)
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


@torch.no_grad()
def randomize_mixer_logits(sites, logit_std: float | None, generator: torch.Generator) -> None:
    """b_res ← N(0, s²) i.i.d. on every site, in order (the ensembles' random mixers); ``None`` keeps the init."""
    if logit_std is None:
        return
    for hc in sites:
        r = hc.mixer.num_logits
        if r:
            hc.bias[-r:] = logit_std * torch.randn(r, generator=generator)


@dataclass
class RandomJPmHCEnsemble(RandomMixerEnsemble):
    """Randomly initialised JPmHC language models: the same random mixers, with real branches.

    One model: ``JPmHCModel`` (Llama attention with GQA + SwiGLU MLP, pre-RMSNorm, dynamic hyper-connections)
    with transformers' initialisation (weights and embeddings N(0, 0.02²), Φ = 0), in float64 streams,
    then the mixer logits b_res of its 2L sites drawn N(0, s²) by ``randomize_mixer_logits`` — the same
    draw as ``RandomHyperConnectionEnsemble`` — and a random sequence of ``num_tokens`` token ids.
    Φ stays 0, so the coefficients still do not depend on the streams.
    """

    num_tokens: int = 2

    positive_fields = (*RandomMixerEnsemble.positive_fields, "num_tokens")

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_size % 16:
            raise ValueError(f"hidden_size must be a multiple of 16 (4 heads of width ≥ 4), got {self.hidden_size}")
        self.config = JPmHCConfig(
            vocab_size=128,
            hidden_size=self.hidden_size,
            intermediate_size=2 * self.hidden_size,
            num_hidden_layers=self.depth,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max(64, self.num_tokens),
            num_streams=self.num_streams,
            mixer=self.mixer,
            grassmann_rank=self.grassmann_rank,
            attn_implementation="eager",  # the mask is an explicit tensor: batching Jacobian rows cannot change it
        )
        self.mixer = self.config.mixer

    def sample_model(self, generator: torch.Generator) -> tuple[JPmHCModel, torch.Tensor]:
        """One randomly initialised LM (eval mode, float64) and its input ids (T,)."""
        seed = int(torch.randint(2**62, (1,), generator=generator))
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # transformers' init draws from the global generator
            model = JPmHCModel(self.config).double().eval()
        randomize_mixer_logits([hc for layer in model.layers for hc in (layer.attn_hc, layer.mlp_hc)], self.logit_std, generator)
        return model, torch.randint(3, self.config.vocab_size, (self.num_tokens,), generator=generator)


@torch.no_grad()
def gaussian_branch_control(
    coefficients: SiteCoefficients, gain, kappa4, hidden: int, draws: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictor's own ensemble at a measured gain profile: a control for the real-LM comparison.

    For one token position's sites — pre (K, n), post (K, n), H (K, n, n), gains g_k and β_k (K,), e.g. a
    ``SiteMeasurement`` at position t — draws ``draws`` stacks J = Π_k (H_kᵀ ⊗ I_C + post_k pre_kᵀ ⊗ W_k) with
    Gaussian branches W_k: a square Gaussian for β_k < 0.5, else a product A·B of inner rank round(C/β_k)
    (β ≈ C/r), each rescaled to tr(W Wᵀ)/C = g_k² exactly. Returns the prediction from each draw's own
    (g_k, β_k) and the exact (m₁, m₂) of that draw, both (draws, 2).

    Same coefficients, gains and β as the LM, same pipeline, but branches that satisfy the predictor's
    freeness assumption: a miss here is a bug or a finite-C effect of the recursion; a miss on the LM
    that is absent here comes from the real branches (non-freeness).
    """
    from .free_probability import jacobian_moments

    a = coefficients.mixer.double().transpose(-1, -2).contiguous()
    b = coefficients.post.double()[:, :, None] * coefficients.pre.double()[:, None, :]
    gain = torch.as_tensor(gain, dtype=torch.float64).flatten()
    kappa4 = torch.as_tensor(kappa4, dtype=torch.float64).flatten()
    sites, n = a.shape[0], a.shape[-1]
    eye = torch.eye(hidden, dtype=torch.float64)
    one = SiteCoefficients(*(x.unsqueeze(0) for x in (coefficients.pre, coefficients.post, coefficients.mixer)))
    predicted, empirical = [], []
    for _ in range(draws):
        jacobian = torch.eye(n * hidden, dtype=torch.float64)
        betas = torch.empty(sites, dtype=torch.float64)
        for k in range(sites):
            if kappa4[k] < 0.5:
                w = torch.randn(hidden, hidden, generator=generator, dtype=torch.float64)
            else:
                rank = max(1, min(hidden, round(hidden / kappa4[k].item())))
                w = torch.randn(hidden, rank, generator=generator, dtype=torch.float64)
                w = w @ torch.randn(rank, hidden, generator=generator, dtype=torch.float64)
            w = w * (gain[k] / (w.square().sum() / hidden).sqrt())
            gram = w @ w.T
            betas[k] = (gram @ gram).trace() / hidden / gain[k] ** 4 - 2
            jacobian = (torch.kron(a[k], eye) + torch.kron(b[k], w)) @ jacobian
        values = torch.linalg.svdvals(jacobian).square()
        empirical.append(torch.stack([values.mean(), values.square().mean()]))
        predicted.append(torch.cat(jacobian_moments(one, gain[None], betas[None])))
    return torch.stack(predicted), torch.stack(empirical)


def haar_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-distributed orthogonal matrix (size, size), float64 (QR of a Gaussian, signs fixed by diag R)."""
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@torch.no_grad()
def rotated_branch_control(
    coefficients: SiteCoefficients, blocks: torch.Tensor, draws: int, generator: torch.Generator, side: str = "input"
) -> torch.Tensor:
    """The LM's own branch Jacobians made free: exact (m₁, m₂) (draws, 2) of J = Π_k (H_kᵀ ⊗ I + post_k pre_kᵀ ⊗ B_k V_k)
    with fresh Haar orthogonal V_k per site and draw (``side="input"``; ``"output"``: V_k B_k instead).

    For one token position: pre, post (K, n), H (K, n, n) and the measured blocks J_F (K, C, C) of a
    ``SiteMeasurement(keep_blocks=True)``. A one-sided Haar rotation keeps every singular value of every
    B_k (so g_k, β_k and the prediction are unchanged) and makes B_k R-diagonal and free from the rest of
    the stack — the predictor's assumption — while the unrotated product is the LM's Monte-Carlo Jacobian.
    So on the same model: real vs rotated isolates the non-freeness of the real branches (their singular
    vectors aligned with each other and with the streams), rotated vs predicted is everything else (the
    recursion, finite C). Sharper than ``gaussian_branch_control``, which redraws the whole branch.
    """
    from .jacobian import site_product

    if side not in ("input", "output"):
        raise ValueError(f"side must be 'input' or 'output', got {side!r}")
    hidden = blocks.shape[-1]
    moments = []
    for _ in range(draws):
        if side == "input":
            rotated = [b.double() @ haar_orthogonal(hidden, generator) for b in blocks]
        else:
            rotated = [haar_orthogonal(hidden, generator) @ b.double() for b in blocks]
        values = torch.linalg.svdvals(site_product(coefficients, rotated)).square()
        moments.append(torch.stack([values.mean(), values.square().mean()]))
    return torch.stack(moments)


def paired_relative_error(predicted, empirical) -> tuple[float, float]:
    """Relative error r = Σ p_s / Σ e_s − 1 of per-model predictions p_s against the same models' Monte-Carlo
    values e_s, and its standard error over models (the ratio estimator, paired: the spread of p_s − (1 + r) e_s).

    The pairing matters: each prediction is conditioned on its model's own mixers and measured gains, so
    model-to-model scatter that the predictor follows cancels; what is left is sampling noise plus any bias.
    Needs S ≥ 2 models for the error (``nan`` otherwise).
    """
    p, e = (torch.as_tensor(x, dtype=torch.float64).flatten() for x in (predicted, empirical))
    if p.shape != e.shape or p.numel() < 1:
        raise ValueError(f"need matching non-empty per-model values, got {tuple(p.shape)} and {tuple(e.shape)}")
    ratio = p.sum() / e.sum()
    samples = p.numel()
    if samples < 2:
        return ratio.item() - 1, float("nan")
    residual = p - ratio * e
    return ratio.item() - 1, (residual.square().sum() / (samples * (samples - 1))).sqrt().item() / e.mean().item()


def bootstrap_relative_error(predicted, empirical, level: float = 0.9, resamples: int = 4000, seed: int = 0):
    """Percentile bootstrap interval (over models, paired) of Σ p_s / Σ e_s − 1: (low, high) at ``level``.

    Unlike the standard error it does not assume the ratio is near-Gaussian, which matters for m₂: with few
    models one model can carry most of Σ e_s, and the interval then shows what leaving it out would do.
    """
    p, e = (torch.as_tensor(x, dtype=torch.float64).flatten() for x in (predicted, empirical))
    if p.shape != e.shape or p.numel() < 2:
        return float("nan"), float("nan")
    index = torch.randint(p.numel(), (resamples, p.numel()), generator=torch.Generator().manual_seed(seed))
    ratios = p[index].sum(1) / e[index].sum(1) - 1
    tail = (1 - level) / 2
    return tuple(torch.quantile(ratios, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist())


def standard_error(values) -> float:
    """Standard error of the mean over models (``nan`` for one model)."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    return (values.std() / values.numel() ** 0.5).item() if values.numel() > 1 else float("nan")


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
