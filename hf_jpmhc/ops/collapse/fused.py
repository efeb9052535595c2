"""Triton kernels for the collapse u = Σ_i w_i X_i (SPEC §1: the branch input, u = Σ preᵢ Xᵢ).

Forward: one program per (token, C block) reads the n stream rows once and writes u — (n+1)·C traffic.
Backward: one program per token loops over C: ∂X_i = w_i ∂u (written) and ∂w_i = Σ_c ∂u_c X_ic (reduced).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import next_pow2

BLOCK_C = 256


@triton.jit
def _collapse_fwd_kernel(p_x, p_w, p_u, C, N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    o_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    o_n = tl.arange(0, N_PAD)
    m_n, m_c = o_n < N, o_c < C
    b_w = tl.load(p_w + row * N + o_n, mask=m_n, other=0.0).to(tl.float32)  # (N_PAD,)
    b_x = tl.load(p_x + row * N * C + o_n[:, None] * C + o_c[None, :], mask=m_n[:, None] & m_c[None, :], other=0.0)
    b_u = tl.sum(b_w[:, None] * b_x.to(tl.float32), axis=0)  # (BLOCK_C,)
    tl.store(p_u + row * C + o_c, b_u.to(p_u.dtype.element_ty), mask=m_c)


@triton.jit
def _collapse_bwd_kernel(p_x, p_w, p_du, p_dx, p_dw, C, N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, N_PAD)
    m_n = o_n < N
    b_w = tl.load(p_w + row * N + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_dw = tl.zeros((N_PAD, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        m_xc = m_n[:, None] & m_c[None, :]
        b_du = tl.load(p_du + row * C + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_x = tl.load(p_x + row * N * C + o_n[:, None] * C + o_c[None, :], mask=m_xc, other=0.0).to(tl.float32)
        b_dx = b_w[:, None] * b_du[None, :]  # ∂X_i = w_i ∂u
        tl.store(p_dx + row * N * C + o_n[:, None] * C + o_c[None, :], b_dx.to(p_dx.dtype.element_ty), mask=m_xc)
        b_dw += b_x * b_du[None, :]
    tl.store(p_dw + row * N + o_n, tl.sum(b_dw, axis=1), mask=m_n)


class CollapseFunction(torch.autograd.Function):
    """u = Σ_i w_i X_i with X (R, n, C) contiguous, w (R, n) float32; u in X's dtype."""

    @staticmethod
    def forward(ctx, streams: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rows, n, c = streams.shape
        u = streams.new_empty(rows, c)
        grid = (rows, triton.cdiv(c, BLOCK_C))
        _collapse_fwd_kernel[grid](streams, weights, u, c, N=n, N_PAD=next_pow2(n, 2), BLOCK_C=BLOCK_C)
        ctx.save_for_backward(streams, weights)
        return u

    @staticmethod
    def backward(ctx, grad_u: torch.Tensor):
        streams, weights = ctx.saved_tensors
        rows, n, c = streams.shape
        grad_x, grad_w = torch.empty_like(streams), torch.empty_like(weights)
        _collapse_bwd_kernel[(rows,)](streams, weights, grad_u.contiguous(), grad_x, grad_w, c,
                                     N=n, N_PAD=next_pow2(n, 2), BLOCK_C=BLOCK_C)  # fmt: skip
        return grad_x, grad_w


def collapse_streams_triton(streams: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(…, n, C), (…, n) or (n,) → (…, C) through the fused kernels."""
    *lead, n, c = streams.shape
    weights = weights.float().expand(*lead, n).reshape(-1, n).contiguous()
    return CollapseFunction.apply(streams.reshape(-1, n, c).contiguous(), weights).view(*lead, c)
