"""Hand-fused C++ loops for the CPU training path (``kernel_backend="compiled"``), float32.

``kernels.cpp`` makes one pass over the streams per token for each of a hyper-connection's training passes;
inductor's code for the same references makes one pass per output (the update's backward: four). Each function
here has the name and signature of the torch reference in ``hf_jpmhc.models.hyper_connection`` it implements,
and returns None where it does not apply — inputs not float32 on CPU, a mixer not given per token, or no C++
build — so that the caller falls back to inductor. The extension is built at first use by
``torch.utils.cpp_extension`` (a C++ compiler, as inductor needs, and ninja; cached under
``TORCH_EXTENSIONS_DIR``); if that fails it warns once and everything runs on inductor.

``keep_freed_memory`` is the process-wide allocator setting that CPU training scripts apply (see there).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import warnings

import torch

__all__ = ["collapse_streams", "keep_freed_memory", "projection_and_rstd", "read_backward_streams", "row_dot",
           "stream_update_grads", "update_streams"]


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a process frees for reuse, instead of handing it back to the kernel;
    True if applied (Linux with glibc), False elsewhere. Process-wide, for the whole run: call it at the start
    of a CPU training (``training/common.build_accelerator`` and the step benchmarks do).

    A training step frees and reallocates stream-sized (n·C per token) buffers at every site. By default glibc
    returns large freed blocks to the kernel (``mmap``-ed blocks, and the top of the heap beyond its trim
    threshold), so the next step takes a page fault, and a zero-filled page, for every 4 KiB it touches again:
    16–90 k faults per step of benchmark 1's model, several % of its time. This serves every block from the heap
    (``M_MMAP_MAX`` = 0) and never trims it (``M_TRIM_THRESHOLD`` = INT_MAX): the process keeps its peak
    memory, as jemalloc, tcmalloc and PyTorch's GPU caching allocator do.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the running process's libc
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


@functools.cache
def _library():
    from torch.utils.cpp_extension import load

    try:
        return load(
            name="hf_jpmhc_cpu",
            sources=[os.path.join(os.path.dirname(__file__), "kernels.cpp")],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],  # OpenMP: at::parallel_for's threads, omp simd
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # no compiler, no ninja, an unsupported platform: inductor covers every pass
        warnings.warn(f"hf_jpmhc's C++ CPU kernels could not be built ({error}); kernel_backend='compiled' "
                      "uses inductor's code for every pass instead", stacklevel=3)  # fmt: skip
        return None


def _library_for(tensors: tuple, shapes: tuple):
    """The extension when every tensor is float32 on CPU with the per-token shape the loops index by (callers pass
    them contiguous), else None: the caller falls back to inductor."""
    fits = all(t.device.type == "cpu" and t.dtype == torch.float32 and t.shape == shape
               for t, shape in zip(tensors, shapes, strict=True))  # fmt: skip
    return _library() if fits else None


def collapse_streams(streams, weights):
    lib = _library_for((streams, weights), (streams.shape, streams.shape[:-1]))
    return None if lib is None else lib.collapse(streams, weights).view(streams.shape[:-2] + streams.shape[-1:])


def projection_and_rstd(streams, phi, eps):
    lib = _library_for((streams, phi), (streams.shape, (phi.shape[0], streams.shape[-2] * streams.shape[-1])))
    if lib is None:
        return None
    zlin, rstd = lib.projection(streams, phi, eps)
    return zlin.view(streams.shape[:-2] + (-1,)), rstd.view(streams.shape[:-2] + (1,))


def row_dot(vector, rows):
    lib = _library_for((vector, rows), (rows.shape[:-2] + rows.shape[-1:], rows.shape))
    return None if lib is None else lib.row_dot(vector, rows).view(rows.shape[:-1])


def read_backward_streams(streams, pre, grad_u, kappa, g, phi):
    lead, (n, c), m = streams.shape[:-2], streams.shape[-2:], phi.shape[0]
    shapes = (streams.shape, lead + (n,), lead + (c,), lead + (1,), lead + (m,), (m, n * c))
    lib = _library_for((streams, pre, grad_u, kappa, g, phi), shapes)
    return None if lib is None else tuple(lib.read_backward(streams, pre, grad_u, kappa, g, phi))


def _update_shapes(streams) -> tuple:
    """X, H, post, f per token."""
    lead, (n, c) = streams.shape[:-2], streams.shape[-2:]
    return streams.shape, lead + (n, n), lead + (n,), lead + (c,)


def update_streams(streams, mixer, post, branch):
    lib = _library_for((streams, mixer, post, branch), _update_shapes(streams))
    return None if lib is None else lib.update(streams, mixer, post, branch)


def stream_update_grads(streams, mixer, post, branch, grad_out):
    lib = _library_for((streams, mixer, post, branch, grad_out), _update_shapes(streams) + (streams.shape,))
    return None if lib is None else tuple(lib.update_backward(streams, mixer, post, branch, grad_out))
