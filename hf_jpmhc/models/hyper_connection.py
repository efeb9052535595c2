"""The n-stream residual: expand, one hyper-connection per branch, collapse (SPEC §1, §3).

Notation key: B batch, T tokens, n streams, C hidden size, r the mixer's logit count.
X ∈ R^{B×T×n×C} are the residual streams; coefficients are always computed in float32.

Mixed precision: the streams keep their own dtype (float32 under ``torch.autocast``, whose embeddings and residual
sums stay float32; the model's dtype when it is loaded in bf16), the branch output f may be in the autocast dtype,
and everything here — RMSNorm, the Φ projection, α, b, the activations, the mixer, the collapse, the stream update
and their backwards — runs with autocast off (``float32_maths``), accumulates in float32 and rounds once to the
streams' dtype. Autocast would otherwise run every product here (Φ projection, collapse, Hᵀ X, the mixers' matmuls)
in bf16/fp16, and round the residual streams to it at every site.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils.generic import maybe_autocast

from .configuration_hyper_connection import HC_KERNEL_BACKENDS, check_choice
from .mixers import Mixer, SinkhornMixer, StiefelMixer, _logit, skew_from_logits

# How much of a branch's read weight sits on its home stream at initialisation (symmetry breaking):
# pre = (1 − ρ)/n · 1 + ρ · e_home, which still sums to 1.
HOME_STREAM_WEIGHT = 0.5


def float32_maths(function):
    """``function(owner, tensor, ...)`` — a method or an autograd Function's backward — run with ``torch.autocast``
    off on ``tensor``'s device (SPEC §1: coefficients and mixers in float32; see the module docstring). Decorates
    each entry into the hyper-connection maths — the read, the write, the collapse head and the backwards of their
    autograd Functions, which a caller may run inside autocast — so that everything beneath them sees its inputs'
    own dtypes. Without autocast it costs one flag test, ≈ 1 µs (at one token a read is ≈ 18 µs on the compiled
    path; transformers' ``maybe_autocast`` alone takes ≈ 3.5 µs even with autocast off); traced by ``torch.compile``,
    ``maybe_autocast`` adds an autocast-off region to the graph only where autocast is on."""

    @functools.wraps(function)
    def call(owner, tensor: torch.Tensor, *args, **kwargs):
        if not torch.compiler.is_compiling() and not torch._C._is_any_autocast_enabled():
            return function(owner, tensor, *args, **kwargs)
        with maybe_autocast(tensor.device.type, enabled=False):
            return function(owner, tensor, *args, **kwargs)

    return call


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rstd = (mean x² + eps)^(-1/2) of float32 x over the last axis (…, 1), as one reduction (no x² temporary)."""
    return torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1] + eps)


def projection_and_rstd(streams: torch.Tensor, phi: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(flatten X) Φᵀ computed as (flatten X · Φᵀ) · rstd, and rstd: (…, n, C), (m, nC) → (…, m), (…, 1),
    float32.

    The same numbers as ``F.linear(x / rms(x), Φ)`` (DeepSeek-V4's UnweightedRMSNorm, in mHC's reordering),
    but X is read once and no normalised nC-wide copy is made or saved for the backward.
    """
    x = streams.flatten(-2).float()  # (…, nC)
    rstd = rms_scale(x, eps)
    return skinny_linear(x, phi.float()) * rstd, rstd


def skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x Wᵀ for a weight with few rows, (…, K), (M, K) → (…, M): computed as (W xᵀ)ᵀ, which MKL runs about 1.9×
    faster on CPU than ``F.linear`` when M ≈ 14 (the result is a transposed view). ``torch.mm`` on the flattened
    tokens, because ``weight @ x.mT`` is folded back into x Wᵀ by ``torch.matmul``. A few tokens (decoding) take
    ``F.linear``: one call instead of five, where per-call overhead is the cost."""
    if x.shape[:-1].numel() <= 16:
        return F.linear(x, weight)
    return torch.mm(weight, x.reshape(-1, x.shape[-1]).T).T.unflatten(0, x.shape[:-1])


def segment_scale(alpha: torch.Tensor, split_sizes: tuple[int, int, int]) -> torch.Tensor:
    """(α_pre, α_post, α_res) repeated over their segments of z: (3,) → (2n + r,), in float32."""
    repeats = alpha.new_tensor(split_sizes, dtype=torch.long)
    return alpha.float().repeat_interleave(repeats, output_size=sum(split_sizes))


def activate_coefficients(z: torch.Tensor, split_sizes: tuple[int, int, int], pre_eps: float):
    """z = [z_pre, z_post, z_res] → pre = σ(z_pre) + eps, post = 2σ(z_post), θ_res = z_res."""
    z_pre, z_post, z_res = z.split(split_sizes, dim=-1)
    pre = torch.sigmoid(z_pre) + pre_eps if pre_eps else torch.sigmoid(z_pre)
    return pre, 2 * torch.sigmoid(z_post), z_res


def dynamic_coefficients(
    streams: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    split_sizes: tuple[int, int, int],
    pre_eps: float = 0.0,
    norm_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pre (…, n), post (…, n), θ_res (…, r) in float32: z = α · RMSNorm(flatten X) Φᵀ + b, then activations.

    The torch reference of ``hf_jpmhc.ops.hc_coefficients`` (its Triton kernel fuses all of it).
    """
    z = torch.addcmul(bias.float(), projection_and_rstd(streams, phi, norm_eps)[0], segment_scale(alpha, split_sizes))
    return activate_coefficients(z, split_sizes, pre_eps)


def read_streams(
    streams: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    split_sizes: tuple[int, int, int],
    pre_eps: float,
    norm_eps: float,
    mixer: Mixer | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A whole read without autograd: u = Σ preᵢ Xᵢ (…, C), post (…, n) and H = mixer(θ_res) (…, n, n), or θ_res
    itself without a mixer. kernel_backend="compiled" runs it as one call — ``hf_jpmhc.ops.cpu``'s C++ read for
    the Sinkhorn, stiefel and Kronecker mixers, else one compiled function: at one token a read is ≈ 45 tiny
    eager ops, and the C++ call is ≈ 7× faster in a hot loop (18 instead of 134 µs, stiefel)."""
    pre, post, z_res = dynamic_coefficients(streams, phi, alpha, bias, split_sizes, pre_eps, norm_eps)
    return collapse_streams(streams, pre), post, z_res if mixer is None else mixer(z_res)


def expand_streams(hidden: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Every stream starts as a copy of the token embedding: (B, T, C) → (B, T, n, C)."""
    return hidden.unsqueeze(-2).expand(*hidden.shape[:-1], num_streams, hidden.shape[-1])


def token_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a b for every token's small matrices, (…, m, k), (…, k, p) → (…, m, p), one of m, k, p being n or 1.

    Eager runs MKL's batched matmul. Under ``torch.compile`` (kernel_backend="compiled", or a compiled model)
    it is broadcast-and-reduce, which inductor fuses with its neighbours into loops that read each nC-wide
    tensor once — on CPU 1.3–3× faster than the batched matmul.
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
    """(…, C), (…, n, C) → (…, n): each row's dot product with the vector, as the batched product vᵀ Xᵀ — on CPU
    3× faster than X v (MKL's batched matrix-vector kernel) and without the n·C-wide temporary of (X ⊙ v).sum(-1)."""
    return token_matmul_nt(vector.unsqueeze(-2), rows).squeeze(-2)


def update_streams(streams: torch.Tensor, mixer: torch.Tensor, post: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """X' = Hᵀ X + post ⊗ f, i.e. X'_t = Σ_s H[s, t] X_s + post_t f (SPEC §1 orientation).

    Computed as X + (H − I)ᵀ X + post ⊗ f: the same sum, but the identity part of H is added exactly. Near
    H = I (every mixer at initialisation) this keeps the streams of a converted model within float rounding
    of the source's residual: on SmolLM2-135M with 60 sites, sinkhorn's logit error drops from 1.1e-4 to 3.9e-5.
    Compiled, inductor fuses it into one loop reading X and f once and writing X' once
    (benchmarks/bench_stream_update.py).
    """
    eye = torch.eye(mixer.shape[-1], dtype=torch.float32, device=mixer.device)
    delta_t, post = mixer.float().transpose(-1, -2) - eye, post.float().unsqueeze(-1)  # (H − I)[t, s], (…, n, 1)
    streams32 = streams.float()
    out = token_matmul(delta_t, streams32).add_(streams32).addcmul_(post, branch.unsqueeze(-2))  # (B, T, n, C)
    return out.to(streams.dtype)  # accumulated in float32 and rounded once, like the Triton kernel


def stream_update_grads(streams, mixer, post, branch, grad_out):
    """The backward of ``update_streams`` per token (each a small batched product), in float32 like the forward:

    ∂X = H ∂X'      ∂H = X ∂X'ᵀ      ∂post = ∂X' f      ∂f = postᵀ ∂X'

    ∂X and ∂f are returned in the dtypes of X and f (which differ under autocast: f in bf16, X in float32).
    """
    x, f, grad_out = streams.float(), branch.float(), grad_out.float()
    grad_streams = token_matmul(mixer.float(), grad_out).to(streams.dtype)  # (…, n, C)
    grad_mixer = token_matmul_nt(x, grad_out)  # (…, n, n)
    grad_post = row_dot(f, grad_out)  # (…, n)
    grad_branch = token_matmul(post.float().unsqueeze(-2), grad_out).squeeze(-2).to(branch.dtype)  # (…, C)
    return grad_streams, grad_mixer, grad_post, grad_branch


def read_backward_streams(streams, pre, grad_u, kappa, g, phi):
    """``HyperConnectionRead``'s ∂X = pre ⊗ ∂u − κ X + g Φ and ∂Φ = gᵀ x (x = flatten X), in float32."""
    x = streams.float()
    grad_x = torch.addcmul(x * -kappa.unsqueeze(-1), pre.unsqueeze(-1), grad_u.unsqueeze(-2))  # (…, n, C)
    g, x_flat = g.reshape(-1, g.shape[-1]), x.reshape(g.shape[:-1].numel(), -1)  # (N, M), (N, K)
    grad_x.view_as(x_flat).addmm_(g, phi.float())  # + g Φ
    return grad_x, g.T @ x_flat  # (…, n, C), (M, K)


@functools.cache
def compiled(function):
    """``function`` on the kernel_backend="compiled" CPU path, made once per function: hf_jpmhc's hand-fused C++
    loop of the same name (``hf_jpmhc.ops.cpu``: one pass over the streams per token) where it takes the inputs,
    else ``torch.compile(function)``. Inputs are passed contiguous, and to inductor detached, so that neither the
    expanded first-layer streams nor autograd flags cause recompiles."""
    try:  # absent when this file runs as remote code without the hf_jpmhc package
        from hf_jpmhc.ops import cpu

        native = getattr(cpu, function.__name__, None)
    except ImportError:
        native = None
    inductor = torch.compile(function)

    def call(*args):
        args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        out = native(*args) if native is not None else None
        if out is None:
            out = inductor(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        return out

    return call


def maybe_compiled(function, use_compiled: bool):
    return compiled(function) if use_compiled and not torch.compiler.is_compiling() else function


# ----------------------------------------------------------------------------------------------------
# the CPU path: the references above as forward, with hand-written backwards that make fewer passes over X
# ----------------------------------------------------------------------------------------------------


class HyperConnectionRead(torch.autograd.Function):
    """(u, post, θ_res) = read(X) on the torch path: ``dynamic_coefficients`` then ``collapse_streams``.

    Autograd through the two references would write four nC-wide gradients and add them; this backward
    writes ∂X once (K = nC, g = ∂z_lin · rstd, κ = rstd²/K Σ ∂z_lin ⊙ z_lin, z_lin = rstd · xΦᵀ):

        ∂pre = ∂pre_direct + X ∂u              ∂X = g Φ − κ x + pre ⊗ ∂u              ∂Φ = gᵀ x

    Saves X (the input), pre, post, z_lin and rstd — nothing else nC-wide.
    """

    @staticmethod
    def forward(ctx, streams, phi, alpha, bias, split_sizes, pre_eps: float, norm_eps: float, use_compiled: bool):
        dense = streams.contiguous()  # one copy of the first layer's expanded streams, not one per pass
        zlin, rstd = maybe_compiled(projection_and_rstd, use_compiled)(dense, phi, norm_eps)  # (…, M), (…, 1)
        scale = segment_scale(alpha, split_sizes)  # (M,)
        pre, post, z_res = activate_coefficients(torch.addcmul(bias.float(), zlin, scale), split_sizes, pre_eps)
        ctx.save_for_backward(streams, phi, scale, pre, post, zlin, rstd)
        ctx.split_sizes, ctx.pre_eps, ctx.use_compiled = split_sizes, pre_eps, use_compiled
        return maybe_compiled(collapse_streams, use_compiled)(dense, pre), post, z_res

    @staticmethod
    @float32_maths
    def backward(ctx, grad_u, grad_post, grad_res):
        streams, phi, scale, pre, post, zlin, rstd = ctx.saved_tensors
        x = streams.contiguous().float()  # (…, n, C); a view for contiguous float32 streams
        grad_u = grad_u.float()
        grad_pre = maybe_compiled(row_dot, ctx.use_compiled)(grad_u, x)  # (…, n): the collapse's ∂pre
        sig_pre, sig_post = pre - ctx.pre_eps, post / 2
        grad_z = torch.cat([grad_pre * sig_pre * (1 - sig_pre), grad_post * post * (1 - sig_post), grad_res], dim=-1)
        lead = tuple(range(grad_z.dim() - 1))
        grad_alpha = torch.stack([part.sum() for part in (grad_z * zlin).sum(lead).split(ctx.split_sizes)])
        grad_bias = grad_z.sum(lead)
        grad_zlin = grad_z * scale  # (…, M)
        g = grad_zlin * rstd
        kappa = (grad_zlin * zlin).sum(-1, keepdim=True) * rstd.square() / x.shape[-1] / x.shape[-2]  # (…, 1)
        grad_x, grad_phi = maybe_compiled(read_backward_streams, ctx.use_compiled)(x, pre, grad_u, kappa, g, phi.float())
        return grad_x.to(streams.dtype), grad_phi, grad_alpha, grad_bias, None, None, None, None


@functools.cache
def compiled_with_backward(function):
    """``torch.compile(function)`` made once per function, for the training path of kernel_backend="compiled":
    unlike ``compiled`` it keeps autograd, so inductor compiles the backward too (AOTAutograd)."""
    return torch.compile(function)


def read_torch_path(args: tuple, use_compiled: bool, mixer: Mixer | None = None):
    """The torch path's read of ``args`` (those of ``read_streams``): without autograd one ``read_streams`` call
    (compiled with kernel_backend="compiled"), in training ``HyperConnectionRead`` and then the mixer — with
    kernel_backend="compiled" its forward and backward compiled (the Sinkhorn rounds, polish and implicit
    backward: 2.7 → 1.2 ms per site at benchmark 1's shape)."""
    if not torch.is_grad_enabled():
        return maybe_compiled(read_streams, use_compiled)(*args, mixer)
    u, post, z_res = HyperConnectionRead.apply(*args, use_compiled)
    if mixer is None:
        return u, post, z_res
    if not use_compiled or torch.compiler.is_compiling():
        return u, post, mixer(z_res)
    return u, post, compiled_with_backward(type(mixer).forward)(mixer, z_res)


class StreamUpdate(torch.autograd.Function):
    """X' = Hᵀ X + post ⊗ f on the torch path: ``update_streams`` forward, ``stream_update_grads`` backward
    (no nC-wide temporaries, and the streams saved once)."""

    @staticmethod
    def forward(ctx, streams, mixer, post, branch, use_compiled: bool):
        ctx.save_for_backward(streams, mixer, post, branch)
        ctx.use_compiled = use_compiled
        return maybe_compiled(update_streams, use_compiled)(streams, mixer, post, branch)

    @staticmethod
    @float32_maths
    def backward(ctx, grad_out):
        streams, mixer, post, branch = ctx.saved_tensors
        grads = maybe_compiled(stream_update_grads, ctx.use_compiled)(streams, mixer, post, branch, grad_out)
        grad_streams, grad_mixer, grad_post, grad_branch = grads
        return (grad_streams, grad_mixer.sum_to_size(mixer.shape).to(mixer.dtype),
                grad_post.sum_to_size(post.shape).to(post.dtype), grad_branch.sum_to_size(branch.shape), None)  # fmt: skip


def _fused_ops(kernel_backend: str, tensor: torch.Tensor):
    """``hf_jpmhc.ops`` when ``kernel_backend`` selects the Triton kernels for ``tensor``, else None (torch path).

    Imported lazily and inside try: this file also runs as remote code without the hf_jpmhc package.
    """
    if kernel_backend in ("torch", "compiled") or (kernel_backend == "auto" and not tensor.is_cuda):
        return None
    try:
        from hf_jpmhc import ops
    except ImportError:
        ops = None
    if ops is None or not ops.triton_available():
        if kernel_backend == "triton":
            raise ValueError(
                "kernel_backend='triton' needs hf_jpmhc.ops and the triton package; use kernel_backend='torch' or 'auto'"
            )
        return None
    return ops if ops.resolve_backend(kernel_backend, tensor) == "triton" else None


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
        recompute: bool = False,
    ):
        super().__init__()
        check_choice("kernel_backend", kernel_backend, HC_KERNEL_BACKENDS)
        self.kernel_backend, self.recompute = kernel_backend, recompute
        self.use_compiled = kernel_backend == "compiled"
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
        # Python floats, not a tensor: from_pretrained builds the model on the meta device, where .tolist() fails.
        pre = [(1 - HOME_STREAM_WEIGHT) / n + HOME_STREAM_WEIGHT * (s == self.home_stream) for s in range(n)]
        pre_bias = torch.tensor([_logit(p) for p in pre])
        return torch.cat([pre_bias, torch.zeros(n), self.mixer.init_logits()])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.phi is not None:
            self.phi.zero_()
        self.bias.copy_(self.initial_bias())
        self.alpha.fill_(self.alpha_init)

    @float32_maths
    def coefficients(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre (…, n), post (…, n), H (…, n, n) in float32; static coefficients have no batch axes."""
        ops = _fused_ops(self.kernel_backend, streams)
        if self.phi is None:
            pre, post, z_res = activate_coefficients(self.bias.float(), self.split_sizes, self.pre_eps)
        elif ops is not None:
            pre, post, z_res = ops.hc_coefficients(streams, self.phi, self.alpha, self.bias, self.split_sizes,
                                                   self.pre_eps, self.norm_eps, kernel_backend="triton")  # fmt: skip
        else:
            pre, post, z_res = dynamic_coefficients(
                streams, self.phi, self.alpha, self.bias, self.split_sizes, self.pre_eps, self.norm_eps
            )
        return pre, post, self._mix(z_res, ops)

    def _mix(self, z_res: torch.Tensor, ops) -> torch.Tensor:
        """H = mixer(θ_res); the Sinkhorn and iterative-Cayley mixers have Triton kernels (``hf_jpmhc.ops``)."""
        mixer, n = self.mixer, self.num_streams
        if ops is not None and isinstance(mixer, SinkhornMixer) and mixer.backward == "implicit" and mixer.eps == 0:
            return ops.sinkhorn(z_res.unflatten(-1, (n, n)), mixer.iters, mixer.newton_steps, kernel_backend="triton")
        if ops is not None and isinstance(mixer, StiefelMixer) and mixer.method == "iterative":
            skew = skew_from_logits(z_res, mixer.skew_basis, n)
            return ops.cayley(skew, mixer.iters, kernel_backend="triton")
        return mixer(z_res)

    def _read(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ops = _fused_ops(self.kernel_backend, streams)
        if ops is None and self.phi is not None:  # the torch path
            args = (streams, self.phi, self.alpha, self.bias, self.split_sizes, self.pre_eps, self.norm_eps)
            return read_torch_path(args, self.use_compiled, self.mixer)
        pre, post, mixer = self.coefficients(streams)
        u = collapse_streams(streams, pre) if ops is None else ops.collapse_streams(streams, pre, kernel_backend="triton")
        return u, post, mixer

    @float32_maths
    def read(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Branch input u = Σ preᵢ Xᵢ (B, T, C), plus the (post, H) that ``write`` needs.

        With ``recompute=True`` (mHC's recomputation) the coefficients, the mixer and the collapse are
        recomputed in the backward pass: only the stream input X is kept for them.
        """
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._read, streams, use_reentrant=False)
        return self._read(streams)

    @float32_maths
    def write(self, streams: torch.Tensor, branch: torch.Tensor, post: torch.Tensor, mixer: torch.Tensor) -> torch.Tensor:
        """X' = Hᵀ X + post ⊗ f."""
        ops = _fused_ops(self.kernel_backend, streams)
        if ops is not None:
            return ops.update_streams(streams, mixer, post, branch, kernel_backend="triton")
        if torch.is_grad_enabled():
            return StreamUpdate.apply(streams, mixer, post, branch, self.use_compiled)
        # inference: the same forward, no autograd bookkeeping
        return maybe_compiled(update_streams, self.use_compiled)(streams, mixer, post, branch)

    def recomputable_write(self, streams, branch, post, mixer, *, enabled: bool = True):
        """``with hc.recomputable_write(X, f, post, H) as X':`` — X' = ``write(X, f, post, H)``; with ``recompute``
        autograd inside the block keeps the write's inputs instead of X' (``RecomputedStreams``)."""
        out = self.write(streams, branch, post, mixer)
        if not (enabled and self.recompute and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return contextlib.nullcontext(out)  # compiled, the partitioner chooses what to save
        return RecomputedStreams(lambda: self.write(streams, branch, post, mixer), out)

    def extra_repr(self) -> str:
        return (
            f"num_streams={self.num_streams}, home_stream={self.home_stream}, dynamic={self.phi is not None}, "
            f"kernel_backend={self.kernel_backend!r}, recompute={self.recompute}"
        )


class RecomputedStreams(torch.autograd.graph.saved_tensors_hooks):
    """``with RecomputedStreams(rebuild, X) as X:`` — autograd inside the block stores ``rebuild`` instead of X.

    mHC's recomputation between a layer's two sites: X_mid = Hᵀ X + post ⊗ f is n·C wide per token, and the
    MLP site's read and write would both save it for their backward. Inside the block every saved reference to
    X_mid (or to a view of it) is kept as its geometry only; the backward rebuilds X_mid once, from the attention
    write's inputs (which that write's own backward keeps anyway), and frees it after its last use. Per layer the
    streams are then stored once, as the layer's input. Every other saved tensor goes to the enclosing
    saved-tensor hooks if there are any (a memory counter, say), else is kept as usual.
    """

    def __init__(self, rebuild, streams: torch.Tensor):
        # the hooks this context shadows, read the way torch's aot_autograd reads them
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self._outer_pack, self._outer_unpack = outer if outer is not None else (None, None)
        self._rebuild, self._streams, self._rebuilt, self._pending = rebuild, streams, None, 0
        self._key = (streams.device, streams.untyped_storage().data_ptr())
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> torch.Tensor:
        super().__enter__()
        streams, self._streams = self._streams, None  # no reference from here on: X_mid dies with the forward
        return streams

    def _pack(self, tensor: torch.Tensor):
        if (tensor.device, tensor.untyped_storage().data_ptr()) == self._key:
            self._pending += 1
            return "rebuild", (tensor.size(), tensor.stride(), tensor.storage_offset())
        return ("outer", self._outer_pack(tensor)) if self._outer_pack is not None else tensor

    def _unpack(self, packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        kind, value = packed
        if kind == "outer":
            return self._outer_unpack(value)
        if self._rebuilt is None:
            self._rebuilt = self._rebuild()
        view = self._rebuilt.as_strided(*value)
        self._pending -= 1
        if self._pending <= 0:
            self._rebuilt = None
        return view


class StreamCollapse(nn.Module):
    """h = Σᵢ wᵢ Xᵢ before the final norm: w = σ(α x̃ Φᵀ + b) (+ eps) — transformers' ``DeepseekV4HyperHead`` —
    or the fixed mean w = 1/n. At init (Φ = 0, b = logit(1/n)) both give the mean, i.e. the plain residual."""

    def __init__(self, hidden_size: int, num_streams: int, *, learned: bool = True, alpha_init: float = 0.01,
                 pre_eps: float = 0.0, norm_eps: float = 1e-6, kernel_backend: str = "auto"):  # fmt: skip
        super().__init__()
        check_choice("kernel_backend", kernel_backend, HC_KERNEL_BACKENDS)
        self.kernel_backend = kernel_backend
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

    @property
    def split_sizes(self) -> tuple[int, int, int]:
        return (self.num_streams, 0, 0)  # only "pre"-type read weights, σ(·) + eps

    def _read_args(self, streams: torch.Tensor) -> tuple:
        """The arguments of ``read_streams`` / ``hc_coefficients`` for this head: one α for every weight."""
        return streams, self.phi, self.alpha.expand(3), self.bias, self.split_sizes, self.pre_eps, self.norm_eps

    @float32_maths
    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        ops = _fused_ops(self.kernel_backend, streams)
        if self.phi is None:  # the fixed mean
            weights = streams.new_full((self.num_streams,), 1 / self.num_streams, dtype=torch.float32)
        elif ops is None:  # the torch path: a hyper-connection read with pre-type weights only
            return read_torch_path(self._read_args(streams), self.kernel_backend == "compiled")[0]
        else:
            weights = ops.hc_coefficients(*self._read_args(streams), kernel_backend="triton")[0]
        if ops is not None:
            return ops.collapse_streams(streams, weights, kernel_backend="triton")
        return collapse_streams(streams, weights)
