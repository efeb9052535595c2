"""Triton kernels for the iterative Cayley transform (JPmHC): one n×n matrix per program, in registers.

Forward:  Y₁ = I + A,  Y ← I + (A/2)(I + Y)  (``iters`` − 1 times), all iterations fused; saves H = Y only.
Backward: ∂L/∂A = ¼ (I + H)ᵀ G (I + H)ᵀ  (exact for the converged map, see ``CayleyIterativeFunction``).
Small matmuls are broadcast-multiply-reduce over (N_PAD, N_PAD, N_PAD): n ≤ 8 is below tl.dot's 16 minimum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import next_pow2


@triton.jit
def _matmul_small(a, b):
    """(N, N) @ (N, N) by broadcast and reduction."""
    return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _cayley_fwd_kernel(p_a, p_h, iters, N: tl.constexpr, N_PAD: tl.constexpr):
    mat = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, N_PAD)
    m = (o_n < N)[:, None] & (o_n < N)[None, :]
    p = mat * N * N + o_n[:, None] * N + o_n[None, :]
    b_half = tl.load(p_a + p, mask=m, other=0.0).to(tl.float32) * 0.5
    b_eye = tl.where((o_n[:, None] == o_n[None, :]) & m, 1.0, 0.0)
    b_h = b_eye + 2.0 * b_half
    for _ in range(iters - 1):
        b_h = b_eye + _matmul_small(b_half, b_eye + b_h)
    tl.store(p_h + p, b_h, mask=m)


@triton.jit
def _cayley_bwd_kernel(p_h, p_g, p_da, N: tl.constexpr, N_PAD: tl.constexpr):
    mat = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, N_PAD)
    m = (o_n < N)[:, None] & (o_n < N)[None, :]
    p = mat * N * N + o_n[:, None] * N + o_n[None, :]
    p_t = mat * N * N + o_n[None, :] * N + o_n[:, None]  # transposed view
    b_eye = tl.where((o_n[:, None] == o_n[None, :]) & m, 1.0, 0.0)
    b_ih_t = b_eye + tl.load(p_h + p_t, mask=m, other=0.0)  # (I + H)ᵀ
    b_g = tl.load(p_g + p, mask=m, other=0.0).to(tl.float32)
    tl.store(p_da + p, 0.25 * _matmul_small(_matmul_small(b_ih_t, b_g), b_ih_t), mask=m)


class CayleyTritonFunction(torch.autograd.Function):
    """H = Cayley(A) for skew A (B, n, n) float32 contiguous; saves H only."""

    @staticmethod
    def forward(ctx, skew: torch.Tensor, iters: int) -> torch.Tensor:
        h = torch.empty_like(skew)
        n = skew.shape[-1]
        _cayley_fwd_kernel[(skew.shape[0],)](skew, h, iters, N=n, N_PAD=next_pow2(n, 2))
        ctx.save_for_backward(h)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        (h,) = ctx.saved_tensors
        grad_a = torch.empty_like(h)
        n = h.shape[-1]
        _cayley_bwd_kernel[(h.shape[0],)](h, grad_h.float().contiguous(), grad_a, N=n, N_PAD=next_pow2(n, 2))
        return grad_a, None


def cayley_triton(skew: torch.Tensor, iters: int) -> torch.Tensor:
    *lead, n, _ = skew.shape
    h = CayleyTritonFunction.apply(skew.float().reshape(-1, n, n).contiguous(), iters)
    return h.view(*lead, n, n).to(skew.dtype)
