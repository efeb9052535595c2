"""Triton kernels for the stream update X'_t = Σ_s H[s, t] X_s + post_t f (SPEC §1, X' = Hᵀ X + post ⊗ f),
computed as X_t + Σ_s (H − I)[s, t] X_s + post_t f like the torch reference (``update_streams``).

Forward: one program per (token, C block) reads X (n·C), f (C) and the n×n mixer once and writes X'
(n·C) — the (2n+1)·C traffic floor of the op; mixing and the rank-1 write are fused, fp32 accumulation.
Backward: one program per token loops over C blocks:
    ∂X = H ∂X'        ∂f = postᵀ ∂X'        (written per block)
    ∂H = X ∂X'ᵀ       ∂post = ∂X' f         (accumulated over C in fp32 registers)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import next_pow2

BLOCK_C = 128


@triton.jit
def _update_fwd_kernel(p_x, p_h, p_post, p_f, p_y, C, N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    o_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    o_n = tl.arange(0, N_PAD)
    m_n, m_c = o_n < N, o_c < C
    m_xc = m_n[:, None] & m_c[None, :]
    m_nn = m_n[:, None] & m_n[None, :]
    b_h = tl.load(p_h + row * N * N + o_n[:, None] * N + o_n[None, :], mask=m_nn, other=0.0).to(tl.float32)  # H[s, t]
    b_post = tl.load(p_post + row * N + o_n, mask=m_n, other=0.0).to(tl.float32)  # (N_PAD,)
    b_x = tl.load(p_x + row * N * C + o_n[:, None] * C + o_c[None, :], mask=m_xc, other=0.0).to(tl.float32)  # X[s, c]
    b_f = tl.load(p_f + row * C + o_c, mask=m_c, other=0.0).to(tl.float32)  # (BLOCK_C,)
    b_delta = b_h - (o_n[:, None] == o_n[None, :]).to(tl.float32)  # (H − I)[s, t]: the identity part is added exactly
    b_y = b_x + tl.sum(b_delta[:, :, None] * b_x[:, None, :], axis=0) + b_post[:, None] * b_f[None, :]  # Y[t, c]
    tl.store(p_y + row * N * C + o_n[:, None] * C + o_c[None, :], b_y.to(p_y.dtype.element_ty), mask=m_xc)


@triton.jit
def _update_bwd_kernel(p_x, p_h, p_post, p_f, p_dy, p_dx, p_dh, p_dpost, p_df, C,
                       N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, N_PAD)
    m_n = o_n < N
    m_nn = m_n[:, None] & m_n[None, :]
    b_h = tl.load(p_h + row * N * N + o_n[:, None] * N + o_n[None, :], mask=m_nn, other=0.0).to(tl.float32)
    b_post = tl.load(p_post + row * N + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_dh = tl.zeros((N_PAD, N_PAD), dtype=tl.float32)
    b_dpost = tl.zeros((N_PAD,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        m_xc = m_n[:, None] & m_c[None, :]
        p_block = row * N * C + o_n[:, None] * C + o_c[None, :]
        b_x = tl.load(p_x + p_block, mask=m_xc, other=0.0).to(tl.float32)  # X[s, c]
        b_dy = tl.load(p_dy + p_block, mask=m_xc, other=0.0).to(tl.float32)  # ∂Y[t, c]
        b_f = tl.load(p_f + row * C + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_dx = tl.sum(b_h[:, :, None] * b_dy[None, :, :], axis=1)  # Σ_t H[s, t] ∂Y[t, c]
        tl.store(p_dx + p_block, b_dx.to(p_dx.dtype.element_ty), mask=m_xc)
        tl.store(p_df + row * C + o_c, tl.sum(b_post[:, None] * b_dy, axis=0).to(p_df.dtype.element_ty), mask=m_c)
        b_dh += tl.sum(b_x[:, None, :] * b_dy[None, :, :], axis=2)  # Σ_c X[s, c] ∂Y[t, c]
        b_dpost += tl.sum(b_dy * b_f[None, :], axis=1)
    tl.store(p_dh + row * N * N + o_n[:, None] * N + o_n[None, :], b_dh, mask=m_nn)
    tl.store(p_dpost + row * N + o_n, b_dpost, mask=m_n)


class StreamUpdateFunction(torch.autograd.Function):
    """X' = Hᵀ X + post ⊗ f with X (R, n, C), H (R, n, n) fp32, post (R, n) fp32, f (R, C), all contiguous."""

    @staticmethod
    def forward(ctx, streams, mixer, post, branch):
        rows, n, c = streams.shape
        out = torch.empty_like(streams)
        grid = (rows, triton.cdiv(c, BLOCK_C))
        _update_fwd_kernel[grid](streams, mixer, post, branch, out, c, N=n, N_PAD=next_pow2(n, 2), BLOCK_C=BLOCK_C)
        ctx.save_for_backward(streams, mixer, post, branch)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        streams, mixer, post, branch = ctx.saved_tensors
        rows, n, c = streams.shape
        grad_x, grad_f = torch.empty_like(streams), torch.empty_like(branch)
        grad_h, grad_post = torch.empty_like(mixer), torch.empty_like(post)
        _update_bwd_kernel[(rows,)](streams, mixer, post, branch, grad_out.contiguous(), grad_x, grad_h, grad_post,
                                    grad_f, c, N=n, N_PAD=next_pow2(n, 2), BLOCK_C=BLOCK_C)  # fmt: skip
        return grad_x, grad_h, grad_post, grad_f


def update_streams_triton(streams, mixer, post, branch):
    """(…, n, C), (…, n, n) or (n, n), (…, n) or (n,), (…, C) → (…, n, C) through the fused kernels."""
    *lead, n, c = streams.shape
    mixer = mixer.float().expand(*lead, n, n).reshape(-1, n, n).contiguous()
    post = post.float().expand(*lead, n).reshape(-1, n).contiguous()
    branch = branch.expand(*lead, c).reshape(-1, c).contiguous()  # loaded in its own dtype, like the reference
    out = StreamUpdateFunction.apply(streams.reshape(-1, n, c).contiguous(), mixer, post, branch)
    return out.view(*lead, n, c)
