"""The per-token passes over the streams in torch, and the autograd Functions that chain them with hand-written
backwards: the maths of the torch and compiled backends (``hc_kernels.py``). SPEC §1.

Notation key: X (…, n, C) the streams, x = flatten X (…, K = nC), Φ (M, K) with M = n_pre + n_post + r rows split
``split_sizes`` = (n_pre, n_post, r), z the coefficient logits (…, M). Everything is float32 whatever the streams'
dtype; results that are stream-shaped return in the streams' dtype.

    z = α_seg · RMSNorm(x) Φᵀ + b        pre = σ(z_pre) + eps, post = 2σ(z_post), θ = z_res
    u = Σᵢ preᵢ Xᵢ                        X' = Hᵀ X + post ⊗ f
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Below this many tokens (decoding) a pass is a few tiny ops where per-call overhead is the cost: the projection
# takes F.linear here and reads Φ as it lies in hf_jpmhc's C++ kernels (packing Φ costs ≈ 6 tokens' products).
FEW_TOKENS = 8


def segment_index(split_sizes: tuple[int, int, int]) -> torch.Tensor:
    """The segment of each row of z: 0 (pre), 1 (post), 2 (res) — the α each row is scaled by: (M,) int64."""
    return torch.repeat_interleave(torch.arange(3), torch.tensor(split_sizes))


def segment_scale(alpha: torch.Tensor, split_sizes: tuple[int, int, int]) -> torch.Tensor:
    """(α_pre, α_post, α_res) repeated over their segments of z: (3,) → (M,), in float32."""
    repeats = alpha.new_tensor(split_sizes, dtype=torch.long)
    return alpha.float().repeat_interleave(repeats, output_size=sum(split_sizes))


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rstd = (mean x² + eps)^(-1/2) of float32 x over the last axis (…, 1), as one reduction (no x² temporary)."""
    return torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1] + eps)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x Wᵀ for a weight with few rows, (…, K), (M, K) → (…, M): computed as (W xᵀ)ᵀ, which MKL runs about 1.9×
    faster on CPU than ``F.linear`` when M ≈ 14 (the result is a transposed view). ``torch.mm`` on the flattened
    tokens, because ``weight @ x.mT`` is folded back into x Wᵀ by ``torch.matmul``. Fewer than ``FEW_TOKENS``
    tokens take ``F.linear``: one call instead of five."""
    if x.shape[:-1].numel() < FEW_TOKENS:
        return F.linear(x, weight)
    return torch.mm(weight, x.reshape(-1, x.shape[-1]).T).T.unflatten(0, x.shape[:-1])


def projection_and_rstd(streams: torch.Tensor, phi: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(flatten X) Φᵀ computed as (flatten X · Φᵀ) · rstd, and rstd: (…, n, C), (M, K) → (…, M), (…, 1).

    The same numbers as ``F.linear(x / rms(x), Φ)`` (DeepSeek-V4's UnweightedRMSNorm, in mHC's reordering),
    but X is read once and no normalised nC-wide copy is made or saved for the backward.
    """
    x = streams.flatten(-2).float()  # (…, K)
    rstd = rms_scale(x, eps)
    return skinny_linear(x, phi.float()) * rstd, rstd


def activate_coefficients(z: torch.Tensor, split_sizes: tuple[int, int, int], pre_eps: float):
    """z = [z_pre, z_post, z_res] → pre = σ(z_pre) + eps, post = 2σ(z_post), θ_res = z_res."""
    z_pre, z_post, z_res = z.split(split_sizes, dim=-1)
    pre = torch.sigmoid(z_pre) + pre_eps if pre_eps else torch.sigmoid(z_pre)
    return pre, 2 * torch.sigmoid(z_post), z_res


def dynamic_coefficients(streams, phi, alpha, bias, split_sizes, pre_eps: float = 0.0, norm_eps: float = 1e-6):
    """pre (…, n_pre), post (…, n_post), θ_res (…, r) in float32: z = α · RMSNorm(flatten X) Φᵀ + b, activated."""
    z = torch.addcmul(bias.float(), projection_and_rstd(streams, phi, norm_eps)[0], segment_scale(alpha, split_sizes))
    return activate_coefficients(z, split_sizes, pre_eps)


def token_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a b for every token's small matrices, (…, m, k), (…, k, p) → (…, m, p), one of m, k, p being n or 1.

    Eager runs MKL's batched matmul. Under ``torch.compile`` it is broadcast-and-reduce, which inductor fuses with
    its neighbours into loops that read each nC-wide tensor once — on CPU 1.3–3× faster than the batched matmul.
    """
    if torch.compiler.is_compiling():
        return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)
    return torch.matmul(a, b)


def token_matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a bᵀ per token, (…, m, k), (…, p, k) → (…, m, p): ``token_matmul`` for a product over the last (contiguous)
    axis of both, which inductor vectorises best."""
    if torch.compiler.is_compiling():
        return (a.unsqueeze(-2) * b.unsqueeze(-3)).sum(-1)
    return torch.matmul(a, b.transpose(-1, -2))


def collapse_streams(streams: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """u = Σ_i w_i X_i: (…, n, C), (…, n) → (…, C), accumulated in float32, returned in the streams' dtype."""
    return token_matmul(weights.float().unsqueeze(-2), streams.float()).squeeze(-2).to(streams.dtype)


def row_dot(vector: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(…, C), (…, n, C) → (…, n) in float32: each row's dot product with the vector, as the batched product vᵀ Xᵀ
    — on CPU 3× faster than X v and without the n·C-wide temporary of (X ⊙ v).sum(-1)."""
    return token_matmul_nt(vector.float().unsqueeze(-2), rows.float()).squeeze(-2)


def read_streams(streams, phi, alpha, bias, split_sizes, pre_eps: float, norm_eps: float, mixer=None):
    """A whole read without autograd: u = Σ preᵢ Xᵢ (…, C), post (…, n) and H = mixer(θ_res) (…, n, n), or θ_res
    itself without a mixer."""
    pre, post, z_res = dynamic_coefficients(streams, phi, alpha, bias, split_sizes, pre_eps, norm_eps)
    return collapse_streams(streams, pre), post, z_res if mixer is None else mixer(z_res)


def update_streams(streams: torch.Tensor, mixer: torch.Tensor, post: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """X' = Hᵀ X + post ⊗ f, i.e. X'_t = Σ_s H[s, t] X_s + post_t f (SPEC §1 orientation).

    Computed as X + (H − I)ᵀ X + post ⊗ f: the same sum, but the identity part of H is added exactly. Near
    H = I (every mixer at initialisation) this keeps the streams of a converted model within float rounding
    of the source's residual: on SmolLM2-135M with 60 sites, sinkhorn's logit error drops from 1.1e-4 to 3.9e-5.
    """
    eye = torch.eye(mixer.shape[-1], dtype=torch.float32, device=mixer.device)
    delta_t, post = mixer.float().transpose(-1, -2) - eye, post.float().unsqueeze(-1)  # (H − I)[t, s], (…, n, 1)
    streams32 = streams.float()
    out = token_matmul(delta_t, streams32).add_(streams32).addcmul_(post, branch.float().unsqueeze(-2))
    return out.to(streams.dtype)  # accumulated in float32 and rounded once, like the Triton kernel


def stream_update_grads(streams, mixer, post, branch, grad_out):
    """The backward of ``update_streams`` per token, in float32 (each a small batched product):

    ∂X = H ∂X'      ∂H = X ∂X'ᵀ      ∂post = ∂X' f      ∂f = postᵀ ∂X'
    """
    grad_out, streams = grad_out.float(), streams.float()
    grad_streams = token_matmul(mixer.float(), grad_out)  # (…, n, C)
    grad_mixer = token_matmul_nt(streams, grad_out)  # (…, n, n)
    grad_post = row_dot(branch, grad_out)  # (…, n)
    grad_branch = token_matmul(post.float().unsqueeze(-2), grad_out).squeeze(-2)  # (…, C)
    return grad_streams, grad_mixer, grad_post, grad_branch


def read_backward_streams(streams, pre, grad_u, kappa, g, phi):
    """``HyperConnectionRead``'s ∂X = pre ⊗ ∂u − κ X + g Φ and ∂Φ = gᵀ x (x = flatten X), in float32."""
    x = streams.float()
    grad_x = torch.addcmul(x * -kappa.unsqueeze(-1), pre.unsqueeze(-1), grad_u.unsqueeze(-2))  # (…, n, C)
    g, x_flat = g.reshape(-1, g.shape[-1]), x.reshape(g.shape[:-1].numel(), -1)  # (N, M), (N, K)
    grad_x.view_as(x_flat).addmm_(g, phi.float())  # + g Φ
    return grad_x, g.T @ x_flat  # (…, n, C), (M, K)


def coefficient_grads(grad_pre, grad_post, grad_res, pre, post, zlin, rstd, scale, pre_eps: float, width: int):
    """The coefficients' backward up to the pass over X, shared by the torch and Triton reads: from ∂pre, ∂post,
    ∂θ (…, ·) and the saved pre, post, z_lin = rstd · xΦᵀ (…, M), rstd (…, 1) and per-row α ``scale`` (M,),

        ∂z = [∂pre σ'(z_pre), ∂post 2σ'(z_post), ∂θ]     ∂scale = Σ ∂z ⊙ z_lin     ∂b = Σ ∂z
        g = ∂z_lin · rstd (∂z_lin = ∂z ⊙ scale)          κ = rstd² / K · Σ_m ∂z_lin ⊙ z_lin   (K = ``width`` = nC)

    summed over the tokens where marked; the pass over X then forms ∂X = g Φ − κ x (+ the collapse's term) and
    ∂Φ = gᵀ x. Returns ∂scale (M,), ∂b (M,), g (…, M), κ (…, 1)."""
    sig_pre, sig_post = pre - pre_eps, post / 2
    grad_z = torch.cat([grad_pre * sig_pre * (1 - sig_pre), grad_post * post * (1 - sig_post), grad_res], dim=-1)
    tokens = tuple(range(grad_z.dim() - 1))
    grad_zlin = grad_z * scale
    kappa = (grad_zlin * zlin).sum(-1, keepdim=True) * rstd.square() / width
    return (grad_z * zlin).sum(tokens), grad_z.sum(tokens), grad_zlin * rstd, kappa


class StreamPasses:
    """The passes above, as one backend runs them: this class runs them as written; the compiled backend swaps in
    hf_jpmhc's C++ loops or inductor's code for each (``hc_kernels.CompiledKernels``)."""

    projection_and_rstd = staticmethod(projection_and_rstd)
    collapse_streams = staticmethod(collapse_streams)
    row_dot = staticmethod(row_dot)
    read_backward_streams = staticmethod(read_backward_streams)
    read_streams = staticmethod(read_streams)
    update_streams = staticmethod(update_streams)
    stream_update_grads = staticmethod(stream_update_grads)


class HyperConnectionRead(torch.autograd.Function):
    """(u, post, θ_res) = read(X) with training: ``dynamic_coefficients`` then ``collapse_streams``.

    Autograd through the two would write four nC-wide gradients and add them; this backward writes ∂X once
    (K = nC, g = ∂z_lin · rstd, κ = rstd²/K Σ ∂z_lin ⊙ z_lin, z_lin = rstd · xΦᵀ):

        ∂pre = ∂pre_direct + X ∂u              ∂X = g Φ − κ x + pre ⊗ ∂u              ∂Φ = gᵀ x

    Saves X (the input), pre, post, z_lin and rstd — nothing else nC-wide. ``passes`` is the backend's
    ``StreamPasses``.
    """

    @staticmethod
    def forward(ctx, streams, phi, alpha, bias, split_sizes, pre_eps: float, norm_eps: float, passes):
        dense = streams.contiguous()  # one copy of the first layer's expanded streams, not one per pass
        zlin, rstd = passes.projection_and_rstd(dense, phi, norm_eps)  # (…, M), (…, 1)
        scale = segment_scale(alpha, split_sizes)  # (M,)
        pre, post, z_res = activate_coefficients(torch.addcmul(bias.float(), zlin, scale), split_sizes, pre_eps)
        ctx.save_for_backward(streams, phi, scale, pre, post, zlin, rstd)
        ctx.split_sizes, ctx.pre_eps, ctx.passes = split_sizes, pre_eps, passes
        return passes.collapse_streams(dense, pre), post, z_res

    @staticmethod
    def backward(ctx, grad_u, grad_post, grad_res):
        streams, phi, scale, pre, post, zlin, rstd = ctx.saved_tensors
        x = streams.contiguous().float()  # (…, n, C); a view for contiguous float32 streams
        grad_u = grad_u.float()
        grad_pre = ctx.passes.row_dot(grad_u, x)  # (…, n): the collapse's ∂pre
        grad_scale, grad_bias, g, kappa = coefficient_grads(grad_pre, grad_post, grad_res, pre, post, zlin, rstd,
                                                            scale, ctx.pre_eps, x.shape[-2] * x.shape[-1])  # fmt: skip
        grad_alpha = torch.stack([part.sum() for part in grad_scale.split(ctx.split_sizes)])
        grad_x, grad_phi = ctx.passes.read_backward_streams(x, pre, grad_u, kappa, g, phi.float())
        return grad_x.to(streams.dtype), grad_phi, grad_alpha, grad_bias, None, None, None, None


class StreamUpdate(torch.autograd.Function):
    """X' = Hᵀ X + post ⊗ f with training: ``update_streams`` forward, ``stream_update_grads`` backward (no
    nC-wide temporaries, the streams saved once). Gradients return in their inputs' dtypes."""

    @staticmethod
    def forward(ctx, streams, mixer, post, branch, passes):
        ctx.save_for_backward(streams, mixer, post, branch)
        ctx.passes = passes
        return passes.update_streams(streams, mixer, post, branch)

    @staticmethod
    def backward(ctx, grad_out):
        streams, mixer, post, branch = ctx.saved_tensors
        grad_streams, grad_mixer, grad_post, grad_branch = ctx.passes.stream_update_grads(
            streams, mixer, post, branch, grad_out
        )
        return (grad_streams.to(streams.dtype), grad_mixer.sum_to_size(mixer.shape).to(mixer.dtype),
                grad_post.sum_to_size(post.shape).to(post.dtype),
                grad_branch.sum_to_size(branch.shape).to(branch.dtype), None)  # fmt: skip
