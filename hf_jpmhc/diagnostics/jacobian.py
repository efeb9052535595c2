"""Empirical Jacobian spectrum of the stream map X_L ← X_0 (SPEC §4): exact, or by randomised probing.

Both work on any ``stream_map``: a function from streams (B, …) to streams (B, …) that treats the leading
batch axis independently (true of every decoder stack: batch items never interact). The batch axis then
carries the probes, so one forward and one backward give many vector-Jacobian products at once, through
any autograd Function (the mixers' implicit backwards included).

* ``exact_jacobian``: all N rows by N simultaneous VJPs (N = the stream size per item; small models).
* ``jacobian_moment_estimates``: Hutchinson estimates of m₁ = tr(JJᵀ)/N = E‖Jᵀy‖²/N and
  m₂ = tr((JJᵀ)²)/N = E‖JJᵀy‖²/N with Rademacher probes y; J(Jᵀy) is a JVP, obtained by differentiating
  the VJP with respect to y (double backward). Memory is that of a batch of ``num_probes`` items.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.stream_passes import collapse_streams
from ..models.modeling_jpmhc import CACHE
from .ensemble import SiteCoefficients

StreamMap = Callable[[torch.Tensor], torch.Tensor]


def exact_jacobian(stream_map: StreamMap, streams: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """J = ∂ vec(X_L) / ∂ vec(X_0) (N, N) at one item ``streams`` (no batch axis): N VJPs, ``chunk_size`` at a time.

    A stream map is square (streams in, streams out), so item i of a batch of N copies asks for row i.
    """
    size = streams.numel()
    chunk = chunk_size or size
    rows = []
    for start in range(0, size, chunk):
        count = min(chunk, size - start)
        inputs = streams.detach().unsqueeze(0).repeat(count, *([1] * streams.dim())).requires_grad_(True)
        outputs = stream_map(inputs).flatten(1)  # (count, N)
        seeds = torch.zeros_like(outputs)
        seeds[torch.arange(count), start + torch.arange(count)] = 1.0
        (grad,) = torch.autograd.grad(outputs, inputs, seeds)
        rows.append(grad.flatten(1))
    return torch.cat(rows)


def squared_singular_values(jacobian: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of JᵀJ (ascending, float64, clipped at 0)."""
    j = jacobian.double()
    return torch.linalg.eigvalsh(j.T @ j).clamp_min(0.0)


def jacobian_moment_estimates(
    stream_map: StreamMap, streams: torch.Tensor, num_probes: int = 32, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """Hutchinson estimates (m₁, m₂) of tr(JJᵀ)/N and tr((JJᵀ)²)/N at one item ``streams`` (no batch axis)."""
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    inputs = streams.detach().unsqueeze(0).repeat(num_probes, *([1] * streams.dim())).requires_grad_(True)
    outputs = stream_map(inputs)
    probes = (torch.randint(0, 2, outputs.shape, generator=generator) * 2 - 1).to(outputs.dtype).requires_grad_(True)
    (vjp,) = torch.autograd.grad(outputs, inputs, probes, create_graph=True)  # Jᵀy
    (jjt_y,) = torch.autograd.grad(vjp, probes, vjp.detach())  # J(Jᵀy) = JJᵀy
    size = streams.numel()
    m1 = vjp.detach().flatten(1).square().sum(1).mean().item() / size
    m2 = jjt_y.flatten(1).square().sum(1).mean().item() / outputs[0].numel()
    return m1, m2


def model_stream_map(model: torch.nn.Module, input_ids: torch.Tensor) -> StreamMap:
    """The stream map X_L ← X_0 of a JPmHC LM's decoder stack on one sequence ``input_ids`` (T,).

    Returns f: streams (B, T, n, C) → streams (B, T, n, C): the model runs on B copies of the sequence, a
    pre-hook on the first decoder layer swaps in the given X_0, a hook on the last one captures X_L.
    """
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no decoder layers (expected model.model.layers)")
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be one sequence (T,), got shape {tuple(input_ids.shape)}")

    def stream_map(streams: torch.Tensor) -> torch.Tensor:
        captured = {}
        swap = layers[0].register_forward_pre_hook(lambda module, args: (streams.to(args[0].dtype),) + args[1:])
        grab = layers[-1].register_forward_hook(lambda module, args, output: captured.setdefault("out", output))
        try:
            base(input_ids=input_ids.expand(streams.shape[0], -1), use_cache=False)
        finally:
            swap.remove(), grab.remove()
        return captured["out"]

    return stream_map


def token_stream_map(stream_map: StreamMap, streams: torch.Tensor, position: int) -> StreamMap:
    """The diagonal block X_L[t] ← X_0[t] of a stream map over tokens (…, T, n, C): the other tokens held at ``streams``.

    Under a causal mask a change of X_0[t] reaches X_L[t] only along token t, so this block is the product
    of the sites' same-token blocks — the per-position Jacobian the predictor describes.
    """

    def block(token_streams: torch.Tensor) -> torch.Tensor:  # (B, n, C) → (B, n, C)
        full = streams.detach().unsqueeze(0).repeat(token_streams.shape[0], *([1] * streams.dim()))
        full = torch.cat([full[:, :position], token_streams.unsqueeze(1), full[:, position + 1 :]], dim=1)
        return stream_map(full)[:, position]

    return block


@dataclass
class SiteMeasurement:
    """What the predictor needs from a JPmHC LM, per token position t and site k (stream order).

    coefficients: pre (T, K, n), post (T, K, n), H (T, K, n, n) at the streams each site reads;
    gain:   g (T, K) with g² = tr(J_F J_Fᵀ)/C, J_F = ∂f[t]/∂u[t] the branch's same-token Jacobian,
            RMSNorm included (so g carries its 1/rms(u));
    kappa4: β (T, K) = (tr((J_F J_Fᵀ)²)/C) / g⁴ − 2, the normalised fourth free cumulant (0 if circular);
    blocks: the J_F themselves (T, K, C, C), if asked for (``measure_sites(..., keep_blocks=True)``).
    """

    coefficients: SiteCoefficients
    gain: torch.Tensor
    kappa4: torch.Tensor
    blocks: torch.Tensor | None = None


def _branch_blocks(branch: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    """The same-token blocks J = ∂f[t]/∂u[t] (T, C, C) of a branch f on u (T, C), float64: T·C VJPs."""
    tokens, hidden = u.shape
    count = tokens * hidden
    inputs = u.detach().unsqueeze(0).repeat(count, 1, 1).requires_grad_(True)
    outputs = branch(inputs)  # (T·C, T, C)
    seeds = torch.zeros_like(outputs)
    rows = torch.arange(count)
    seeds[rows, rows // hidden, rows % hidden] = 1.0
    (grad,) = torch.autograd.grad(outputs, inputs, seeds)
    grad = grad.double().view(tokens, hidden, tokens, hidden)
    return grad[torch.arange(tokens), :, torch.arange(tokens)]  # (T, C, C)


def measure_sites(model: torch.nn.Module, input_ids: torch.Tensor, keep_blocks: bool = False) -> SiteMeasurement:
    """Coefficients and branch Jacobian moments of every hyper-connection site of a JPmHC LM on one sequence (T,).

    One forward pass records the streams each site reads and the attention's keyword arguments (rotary
    embeddings, mask); each branch f = Attn(norm(u)) or MLP(norm(u)) is then differentiated alone, at the
    recorded u, with the other tokens held fixed. The coefficient path ∂(pre, post, H)/∂X is not measured:
    it is zero at initialisation (Φ = 0). ``keep_blocks`` also returns the blocks J_F (T, K, C, C), from which
    ``site_product`` rebuilds each position's stream Jacobian exactly.
    """
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(layer, "attn_hc") for layer in layers):
        raise ValueError(f"{type(model).__name__} is not a JPmHC LM (expected model.model.layers[i].attn_hc / mlp_hc)")
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be one sequence (T,), got shape {tuple(input_ids.shape)}")
    sites = [(hc, i, kind) for i, layer in enumerate(layers) for hc, kind in ((layer.attn_hc, "attn"), (layer.mlp_hc, "mlp"))]
    streams_read: list[torch.Tensor] = []
    attention_kwargs: dict[int, dict] = {}

    def recorder(hc):
        def read(streams: torch.Tensor):
            streams_read.append(streams.detach()[0])  # (T, n, C)
            return type(hc).read(hc, streams)

        return read

    def keep_kwargs(index: int):
        def hook(module, args, kwargs):
            attention_kwargs[index] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", CACHE)}

        return hook

    hooks = [layer.self_attn.register_forward_pre_hook(keep_kwargs(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for hc, *_ in sites:
            hc.read = recorder(hc)
        with torch.no_grad():
            base(input_ids=input_ids[None], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        for hc, *_ in sites:
            hc.__dict__.pop("read", None)

    pres, posts, mixers, all_blocks = [], [], [], []
    for (hc, index, kind), streams in zip(sites, streams_read):
        tokens, n = streams.shape[:2]
        with torch.no_grad():
            pre, post, mixer = hc.coefficients(streams)  # static sites: no token axis
            pre, post, mixer = pre.expand(tokens, n), post.expand(tokens, n), mixer.expand(tokens, n, n)
            u = collapse_streams(streams, pre)  # (T, C)
        layer = layers[index]
        if kind == "attn":

            def branch(x, layer=layer, kwargs=attention_kwargs[index]):
                return layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)[0]
        else:

            def branch(x, layer=layer):
                return layer.mlp(layer.post_attention_layernorm(x))

        pres.append(pre), posts.append(post), mixers.append(mixer), all_blocks.append(_branch_blocks(branch, u))
    blocks = torch.stack(all_blocks, 1)  # (T, K, C, C)
    hidden = blocks.shape[-1]
    gram = blocks @ blocks.transpose(-1, -2)
    m1 = gram.diagonal(dim1=-2, dim2=-1).sum(-1) / hidden  # (T, K)
    m2 = (gram @ gram).diagonal(dim1=-2, dim2=-1).sum(-1) / hidden
    coefficients = SiteCoefficients(torch.stack(pres, 1).float(), torch.stack(posts, 1).float(), torch.stack(mixers, 1).float())
    return SiteMeasurement(coefficients, m1.sqrt(), m2 / m1.square() - 2, blocks if keep_blocks else None)


def site_product(coefficients: SiteCoefficients, blocks) -> torch.Tensor:
    """J = J_K ⋯ J_1 (nC, nC), J_k = H_kᵀ ⊗ I_C + post_k pre_kᵀ ⊗ B_k, for one token position: pre, post (K, n),
    H (K, n, n), blocks B_k (K, C, C) or a list of K (C, C). With B_k the measured J_F of an LM this is its
    block ∂X_L[t]/∂X_0[t] (under the causal mask, the product of the sites' same-token blocks), so the
    Monte-Carlo Jacobian can be rebuilt from, or with modified, branch Jacobians. Row-major vec(X), X (n, C).
    """
    pre, post, mixer = (x.double() for x in (coefficients.pre, coefficients.post, coefficients.mixer))
    n, hidden = mixer.shape[-1], blocks[0].shape[-1]
    product = torch.eye(n * hidden, dtype=torch.float64).view(n, hidden, n * hidden)  # rows (i, c)
    for k in range(mixer.shape[0]):
        branch = blocks[k].double() @ torch.einsum("j,jcm->cm", pre[k], product)  # B_k (pre_kᵀ X)
        product = torch.einsum("ji,jcm->icm", mixer[k], product) + post[k][:, None, None] * branch  # Hᵀ X + post ⊗ ·
    return product.reshape(n * hidden, n * hidden)


def model_initial_streams(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """X_0 of a JPmHC LM on one sequence (T,): the token embeddings copied to the n streams, (T, n, C)."""
    embeddings = model.get_input_embeddings()(input_ids).detach()  # (T, C)
    return embeddings.unsqueeze(-2).expand(*embeddings.shape[:-1], model.config.num_streams, embeddings.shape[-1]).clone()


def token_spectra(model: torch.nn.Module, input_ids: torch.Tensor, chunk_size: int | None = 256) -> torch.Tensor:
    """Squared singular values of every position's block ∂X_L[t]/∂X_0[t] of a JPmHC LM, (T, nC), exactly."""
    stream_map = model_stream_map(model, input_ids)
    start = model_initial_streams(model, input_ids)
    return torch.stack([
        squared_singular_values(exact_jacobian(token_stream_map(stream_map, start, t), start[t], chunk_size))
        for t in range(start.shape[0])
    ])  # fmt: skip
