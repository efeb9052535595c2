"""Hand-fused C++ loops for the CPU path (``kernel_backend="compiled"``), float32.

``kernels.cpp`` makes one pass over the streams per token for each of a hyper-connection's training passes;
inductor's code for the same references makes one pass per output (the update's backward: four). Without
autograd a whole read — coefficients, mixer and collapse — is one call, with the Sinkhorn, Cayley (stiefel) and
Kronecker mixers' maths per token in C++: at one token (decoding) the cost of a site is its number of calls.
Each function here has the name and signature of the torch reference in ``hf_jpmhc.models.hyper_connection`` it
implements, and returns None where it does not apply — inputs not float32 on CPU, a mixer not given per token,
a mixer without C++ maths, or no C++ build — so that the caller falls back to inductor. The extension is built
at first use by ``torch.utils.cpp_extension`` (a C++ compiler, as inductor needs, and ninja; cached under
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

from hf_jpmhc.models.mixers import KroneckerMixer, SinkhornMixer, StiefelMixer

__all__ = ["collapse_streams", "keep_freed_memory", "projection_and_rstd", "read_backward_streams", "read_streams",
           "row_dot", "stream_update_grads", "update_streams"]


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
    for tensor, shape in zip(tensors, shapes, strict=True):  # a loop: at one token its cost is not negligible
        if not (tensor.is_cpu and tensor.dtype == torch.float32 and tensor.shape == shape):
            return None
    return _library()


def collapse_streams(streams, weights):
    lib = _library_for((streams, weights), (streams.shape, streams.shape[:-1]))
    return None if lib is None else lib.collapse(streams, weights).view(streams.shape[:-2] + streams.shape[-1:])


def projection_and_rstd(streams, phi, eps):
    lib = _library_for((streams, phi), (streams.shape, (phi.shape[0], streams.shape[-2] * streams.shape[-1])))
    if lib is None:
        return None
    zlin, rstd = lib.projection(streams, phi, eps)
    return zlin.view(streams.shape[:-2] + (-1,)), rstd.view(streams.shape[:-2] + (1,))


def _mixer_kind(mixer) -> tuple[int, int, int] | None:
    """(MixerKind, iters, newton_steps) of the mixers whose maths ``read_streams`` has in C++ (no mixer: 0, the
    logits θ themselves), or None for any other mixer."""
    if mixer is None:
        return 0, 0, 0
    if type(mixer) is SinkhornMixer and mixer.eps == 0:
        return 1, mixer.iters, mixer.newton_steps
    if type(mixer) is StiefelMixer and mixer.method == "solve":
        return 2, 0, 0
    return (3, 0, 0) if type(mixer) is KroneckerMixer else None


def read_streams(streams, phi, alpha, bias, split_sizes, pre_eps, norm_eps, mixer=None):
    kind = _mixer_kind(mixer)
    n, c, m = *streams.shape[-2:], phi.shape[0]
    lib = None if kind is None else _library_for((streams, phi, alpha, bias), (streams.shape, (m, n * c), (3,), (m,)))
    if lib is None:
        return None
    return tuple(lib.read_streams(streams, phi, alpha, bias, split_sizes[1], pre_eps, norm_eps, *kind))


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
