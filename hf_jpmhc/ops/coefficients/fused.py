"""Triton kernels for the dynamic coefficients (SPEC §1), with x = flatten(X) ∈ R^K, K = n·C, M = 2n + r:

    z = (x Φᵀ) · rstd(x) · s + b,  rstd = (mean x² + ε)^(-1/2),  s = (α_pre ×n, α_post ×n, α_res ×r)
    pre = σ(z[:n]) + eps_pre,  post = 2σ(z[n:2n]),  θ_res = z[2n:]            (one packed (R, M) output)

Fused in the forward kernel: the sum of squares, the projection (tl.dot, IEEE fp32), the RMS scaling, α, b
and both sigmoids — X is read once and no normalised copy of it is written (the mHC reordering
x̃Φᵀ = rstd · xΦᵀ). Saved: X (the op's input), rstd (R,) and the pre-activation z_lin = rstd·xΦᵀ (R, M).

Backward, with g = ∂L/∂z_lin · rstd (R, M) and κ = rstd²/K · Σ_m ∂L/∂z_lin ⊙ z_lin (R,):
    ∂X = g Φ − κ x          (kernel ``_coeff_dx_kernel``, tiled over rows and K)
    ∂Φ = gᵀ X               (kernel ``_coeff_dphi_kernel``, tiled over M and K, loops over rows)
The activation derivatives, g, κ and the (M,)-sized reductions for α and b are the torch read's own
(``hf_jpmhc.models.stream_passes.coefficient_grads``): O(R·M) elementwise ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_jpmhc.models.stream_passes import coefficient_grads

BLOCK_R, BLOCK_K, BLOCK_M = 16, 64, 32


@triton.jit
def _coeff_fwd_kernel(p_x, p_phi, p_scale, p_bias, p_out, p_zlin, p_rstd, R, K, M, N_PRE, N_POST, pre_eps, norm_eps,
                      BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    o_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_r, m_m = o_r < R, o_m < M
    b_acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    b_sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_x = tl.load(p_x + o_r[:, None].to(tl.int64) * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
        b_x = b_x.to(tl.float32)
        b_phi = tl.load(p_phi + o_m[:, None] * K + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_acc += tl.dot(b_x, tl.trans(b_phi), input_precision="ieee")
        b_sq += tl.sum(b_x * b_x, axis=1)
    b_rstd = 1.0 / tl.sqrt(b_sq / K + norm_eps)
    b_zlin = b_acc * b_rstd[:, None]
    b_scale = tl.load(p_scale + o_m, mask=m_m, other=0.0)
    b_bias = tl.load(p_bias + o_m, mask=m_m, other=0.0)
    b_z = b_zlin * b_scale[None, :] + b_bias[None, :]
    b_sig = 1.0 / (1.0 + tl.exp(-b_z))
    is_pre, is_post = (o_m < N_PRE)[None, :], ((o_m >= N_PRE) & (o_m < N_PRE + N_POST))[None, :]
    b_out = tl.where(is_pre, b_sig + pre_eps, tl.where(is_post, 2.0 * b_sig, b_z))
    m_rm = m_r[:, None] & m_m[None, :]
    p_rm = o_r[:, None].to(tl.int64) * M + o_m[None, :]
    tl.store(p_out + p_rm, b_out, mask=m_rm)
    tl.store(p_zlin + p_rm, b_zlin, mask=m_rm)
    if tl.program_id(1) == 0:  # every M block computes the same rstd; one writes it
        tl.store(p_rstd + o_r, b_rstd, mask=m_r)


@triton.jit
def _coeff_dx_kernel(p_g, p_kappa, p_phi, p_x, p_dx, R, K, M,
                     BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    o_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_r, m_k = o_r < R, o_k < K
    b_acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < M
        b_g = tl.load(p_g + o_r[:, None].to(tl.int64) * M + o_m[None, :], mask=m_r[:, None] & m_m[None, :], other=0.0)
        b_phi = tl.load(p_phi + o_m[:, None] * K + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_acc += tl.dot(b_g, b_phi, input_precision="ieee")
    m_rk = m_r[:, None] & m_k[None, :]
    p_rk = o_r[:, None].to(tl.int64) * K + o_k[None, :]
    b_x = tl.load(p_x + p_rk, mask=m_rk, other=0.0).to(tl.float32)
    b_kappa = tl.load(p_kappa + o_r, mask=m_r, other=0.0)
    tl.store(p_dx + p_rk, (b_acc - b_kappa[:, None] * b_x).to(p_dx.dtype.element_ty), mask=m_rk)


@triton.jit
def _coeff_dphi_kernel(p_g, p_x, p_dphi, R, K, M,
                       BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_m, m_k = o_m < M, o_k < K
    b_acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R)
        m_r = o_r < R
        b_g = tl.load(p_g + o_r[:, None].to(tl.int64) * M + o_m[None, :], mask=m_r[:, None] & m_m[None, :], other=0.0)
        b_x = tl.load(p_x + o_r[:, None].to(tl.int64) * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
        b_acc += tl.dot(tl.trans(b_g), b_x.to(tl.float32), input_precision="ieee")
    tl.store(p_dphi + o_m[:, None] * K + o_k[None, :], b_acc, mask=m_m[:, None] & m_k[None, :])


class CoefficientsFunction(torch.autograd.Function):
    """Packed coefficients (R, M) from x (R, K) contiguous, Φ (M, K), s (M,), b (M,) — all fp32 but x."""

    @staticmethod
    def forward(ctx, x, phi, scale, bias, split_sizes: tuple[int, int, int], pre_eps: float, norm_eps: float):
        rows, k = x.shape
        m = phi.shape[0]
        out = x.new_empty(rows, m, dtype=torch.float32)
        zlin, rstd = torch.empty_like(out), x.new_empty(rows, dtype=torch.float32)
        grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(m, BLOCK_M))
        _coeff_fwd_kernel[grid](x, phi, scale, bias, out, zlin, rstd, rows, k, m, split_sizes[0], split_sizes[1],
                                pre_eps, norm_eps, BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)  # fmt: skip
        ctx.save_for_backward(x, phi, scale, out, zlin, rstd)
        ctx.split_sizes, ctx.pre_eps = split_sizes, pre_eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, phi, scale, out, zlin, rstd = ctx.saved_tensors
        (rows, k), m = x.shape, phi.shape[0]
        pre, post, _ = out.split(ctx.split_sizes, dim=-1)
        grad_scale, grad_bias, g, kappa = coefficient_grads(*grad_out.split(ctx.split_sizes, dim=-1), pre, post, zlin,
                                                            rstd[:, None], scale, ctx.pre_eps, k)  # fmt: skip
        g, kappa = g.contiguous(), kappa.view(rows).contiguous()
        grad_x = grad_phi = None  # each a full pass over X: skipped when not needed (a frozen Φ, say)
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            _coeff_dx_kernel[(triton.cdiv(rows, BLOCK_R), triton.cdiv(k, BLOCK_K))](
                g, kappa, phi, x, grad_x, rows, k, m, BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K
            )
        if ctx.needs_input_grad[1]:
            grad_phi = torch.empty_like(phi)
            _coeff_dphi_kernel[(triton.cdiv(m, BLOCK_M), triton.cdiv(k, BLOCK_K))](
                g, x, grad_phi, rows, k, m, BLOCK_R=2 * BLOCK_R, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K
            )
        return grad_x, grad_phi, grad_scale, grad_bias, None, None, None


def hc_coefficients_triton(streams, phi, alpha, bias, split_sizes, pre_eps, norm_eps):
    """pre (…, n), post (…, n), θ_res (…, r) in fp32 through the fused kernels."""
    *lead, n, c = streams.shape
    scale = torch.cat([a.expand(size) for a, size in zip(alpha.float(), split_sizes)])
    x = streams.reshape(-1, n * c).contiguous()
    out = CoefficientsFunction.apply(x, phi.float().contiguous(), scale, bias.float().contiguous(), tuple(split_sizes),
                                     pre_eps, norm_eps)  # fmt: skip
    pre, post, z_res = out.view(*lead, -1).split(split_sizes, dim=-1)
    return pre, post, z_res
