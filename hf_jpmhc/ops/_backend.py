"""Backend choice shared by every op: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"``, ``"torch"``."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from hf_jpmhc.models.configuration_hyper_connection import KERNEL_BACKENDS, check_choice


@functools.cache
def triton_available() -> bool:
    """True when ``triton`` imports (its kernels then run on CUDA, or on CPU under ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(kernel_backend: str, tensor: torch.Tensor) -> str:
    """Map ``kernel_backend`` to ``"triton"`` or ``"torch"`` for a tensor; invalid choices raise ValueError."""
    check_choice("kernel_backend", kernel_backend, KERNEL_BACKENDS)
    if kernel_backend == "torch":
        return "torch"
    if kernel_backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if not triton_available():
        raise ValueError("kernel_backend='triton' needs the triton package (pip install 'hf_jpmhc[triton]'), "
                         "or use kernel_backend='torch'")  # fmt: skip
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"kernel_backend='triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1), "
            f"got device {tensor.device}; use kernel_backend='torch' or 'auto'"
        )
    return "triton"


def device_guard(tensor: torch.Tensor):
    """Makes ``tensor``'s CUDA device current around a Triton launch: Triton launches on the current device and
    its stream, not on the tensor's (layers on cuda:1 under ``device_map="auto"`` would otherwise run on
    cuda:0). Forward launches only need it: autograd runs a CUDA backward on its device's own thread, with that
    device current. A no-op off CUDA (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def next_pow2(x: int, minimum: int = 1) -> int:
    """The block size covering ``x`` (Triton blocks are powers of two)."""
    return max(minimum, 1 << (max(x, 1) - 1).bit_length())
