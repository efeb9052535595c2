"""Hand-fused C++ loops for the CPU path (``kernel_backend="compiled"``), float32, as registered torch ops.

``kernels.cpp`` makes one pass over the streams per token for each of a hyper-connection's training passes;
inductor's code for the same torch passes makes one pass per output (the update's backward: four). Without
autograd a whole read — coefficients, mixer and collapse — is one call, with the mixer's maths per token in C++
for the mixers that declare it (``Mixer.kernel("cpu")``: Sinkhorn, the Cayley solve, Kronecker): at one token
(decoding) the cost of a site is its number of calls. The loops are registered as ``torch.ops.hf_jpmhc.*`` with
fake implementations, so they compose with ``torch.compile`` and with module hooks.

``NativePasses`` mirrors ``hf_jpmhc.models.stream_passes.StreamPasses`` member by member (a test holds the names
together); each returns None where its loop does not apply — inputs not float32 on CPU, a mixer not given per
token, a mixer without C++ maths, or no C++ build — and the compiled backend then runs inductor's code. The
extension is built at first use by ``torch.utils.cpp_extension`` (a C++ compiler, as inductor needs, and ninja;
cached under ``TORCH_EXTENSIONS_DIR`` in a directory named by a hash of the source and flags), with the numerical
constants of ``NUMERICS`` passed as -D flags; if the build fails it warns once and everything runs on inductor. A
lock left by a killed build is removed after ``STALE_BUILD_LOCK_SECONDS`` (torch would wait for it forever).

``keep_freed_memory`` is the process-wide allocator setting that CPU training scripts apply (see there).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import time
import warnings

import torch

from hf_jpmhc.models import sinkhorn, stream_passes

# The codes by which the C++ read knows a mixer's maths, by the names mixers declare in Mixer.kernel("cpu").
MIXER_KINDS = {"logits": 0, "sinkhorn": 1, "cayley": 2, "kronecker": 3}

# Every constant the C++ loops use, from its one definition; compiled in as -D flags (HF_<name>).
NUMERICS = {
    "NEWTON_BASIN": sinkhorn.NEWTON_BASIN,
    "NEWTON_FROM_BASIN": sinkhorn.NEWTON_FROM_BASIN,
    "NEWTON_STEP_CLAMP": sinkhorn.NEWTON_STEP_CLAMP,
    "SCALING_RIDGE": sinkhorn.SCALING_RIDGE,
    "EARLY_EXIT_ULPS": sinkhorn.EARLY_EXIT_ULPS,
    "ROUND_CHECK_EVERY": sinkhorn.ROUND_CHECK_EVERY,
    "FEW_TOKENS": stream_passes.FEW_TOKENS,
    **{f"MIXER_{name.upper()}": code for name, code in MIXER_KINDS.items()},
}

__all__ = ["MIXER_KINDS", "NUMERICS", "OPS", "NativePasses", "keep_freed_memory", "load"]


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


def build_flags() -> list[str]:
    """-D flags defining ``NUMERICS`` (as HF_<name>) and ``HF_NUMERICS``, their list in this order."""
    defines = [f"-DHF_{name}={value!r}" for name, value in NUMERICS.items()]
    return [*defines, "-DHF_NUMERICS=" + ",".join(f"HF_{name}" for name in NUMERICS)]


STALE_BUILD_LOCK_SECONDS = 600  # a build lock older than this was left by a killed build
OPS = None  # torch.ops.hf_jpmhc once load() has built and loaded the extension
_LOAD_TRIED = False


def load():
    """Build the extension (once; cached on disk) and load it: ``torch.ops.hf_jpmhc``, or None with a warning.
    Called eagerly (by the compiled backend when a module that uses it is made), so that traced code only reads
    ``OPS``."""
    global OPS, _LOAD_TRIED
    if _LOAD_TRIED:
        return OPS
    _LOAD_TRIED = True
    from torch.utils.cpp_extension import load as build_and_load

    source = os.path.join(os.path.dirname(__file__), "kernels.cpp")
    cflags = ["-O3", "-march=native", "-fopenmp", *build_flags()]  # OpenMP: at::parallel_for, omp simd
    # One build directory per source and flags: torch versions a name's builds in one directory, so two installs
    # of hf_jpmhc (two venvs, two checkouts) sharing TORCH_EXTENSIONS_DIR would rebuild it in turn and could load
    # each other's library between a build and a load.
    with open(source, "rb") as file:
        name = "hf_jpmhc_cpu_" + hashlib.sha256(file.read() + " ".join(cflags).encode()).hexdigest()[:12]
    try:
        remove_stale_build_lock(name)
        build_and_load(
            name=name,
            sources=[source],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,  # the ops register themselves (TORCH_LIBRARY)
        )
    except Exception as error:  # no compiler, no ninja, an unsupported platform: inductor covers every pass
        warnings.warn(f"hf_jpmhc's C++ CPU kernels could not be built ({error}); kernel_backend='compiled' "
                      "uses inductor's code for every pass instead", stacklevel=3)  # fmt: skip
        return None
    _register_fakes()
    OPS = torch.ops.hf_jpmhc
    return OPS


def remove_stale_build_lock(name: str) -> None:
    """Remove the build lock of extension ``name`` left by a build that was killed (a build takes under a minute):
    torch's extension loader would otherwise wait for it forever, without a word."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_BUILD_LOCK_SECONDS:
        warnings.warn(f"removing {lock}, left by an interrupted build of hf_jpmhc's C++ CPU kernels", stacklevel=3)
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)


def _register_fakes() -> None:
    """Output shapes for tracing (torch.compile, meta tensors): each op's outputs are shaped like its inputs'."""
    fake = torch.library.register_fake

    def lead(x, *tail):
        return x.new_empty(*x.shape[:-2], *tail)

    fake("hf_jpmhc::collapse")(lambda x, weights: lead(x, x.shape[-1]))
    fake("hf_jpmhc::row_dot")(lambda v, x: lead(x, x.shape[-2]))
    fake("hf_jpmhc::projection")(lambda x, phi, eps: (lead(x, phi.shape[0]), lead(x, 1)))
    fake("hf_jpmhc::read_backward")(lambda x, pre, grad_u, kappa, g, phi: (torch.empty_like(x), torch.empty_like(phi)))
    fake("hf_jpmhc::update")(lambda x, h, post, f: torch.empty_like(x))
    fake("hf_jpmhc::update_backward")(lambda x, h, post, f, grad_out: tuple(map(torch.empty_like, (x, h, post, f))))

    @fake("hf_jpmhc::read_streams")
    def _(x, phi, alpha, bias, segment, n_post, pre_eps, norm_eps, kind, iters, newton_steps, table):
        n, r = x.shape[-2], phi.shape[0] - x.shape[-2] - n_post
        mix = lead(x, r) if kind == MIXER_KINDS["logits"] else lead(x, n, n)
        return lead(x, x.shape[-1]), lead(x, n_post), mix


def _library_for(tensors: tuple, shapes: tuple):
    """The ops when every tensor is float32 on CPU with the per-token shape the loops index by (callers pass them
    contiguous), else None: the caller falls back to inductor."""
    for tensor, shape in zip(tensors, shapes, strict=True):  # a loop: at one token its cost is not negligible
        if not (tensor.is_cpu and tensor.dtype == torch.float32 and tensor.shape == shape):
            return None
    return OPS


@functools.cache
def _segment(split_sizes: tuple[int, int, int]) -> torch.Tensor:
    return stream_passes.segment_index(split_sizes)


_NO_TABLE = torch.empty(0, dtype=torch.int64)


def _update_shapes(streams) -> tuple:
    """X, H, post, f per token."""
    lead, (n, c) = streams.shape[:-2], streams.shape[-2:]
    return streams.shape, lead + (n, n), lead + (n,), lead + (c,)


class NativePasses:
    """The C++ loop of each pass of ``StreamPasses`` that has one, with its signature; None where it does not apply."""

    @staticmethod
    def collapse_streams(streams, weights):
        ops = _library_for((streams, weights), (streams.shape, streams.shape[:-1]))
        return None if ops is None else ops.collapse(streams, weights)

    @staticmethod
    def projection_and_rstd(streams, phi, eps):
        ops = _library_for((streams, phi), (streams.shape, (phi.shape[0], streams.shape[-2] * streams.shape[-1])))
        return None if ops is None else ops.projection(streams, phi, eps)

    @staticmethod
    def row_dot(vector, rows):
        ops = _library_for((vector, rows), (rows.shape[:-2] + rows.shape[-1:], rows.shape))
        return None if ops is None else ops.row_dot(vector, rows)

    @staticmethod
    def read_backward_streams(streams, pre, grad_u, kappa, g, phi):
        lead, (n, c), m = streams.shape[:-2], streams.shape[-2:], phi.shape[0]
        shapes = (streams.shape, lead + (n,), lead + (c,), lead + (1,), lead + (m,), (m, n * c))
        ops = _library_for((streams, pre, grad_u, kappa, g, phi), shapes)
        return None if ops is None else ops.read_backward(streams, pre, grad_u, kappa, g, phi)

    @staticmethod
    def read_streams(streams, phi, alpha, bias, split_sizes, pre_eps, norm_eps, mixer=None):
        kernel = ("logits",) if mixer is None else mixer.kernel("cpu")
        if kernel is None:
            return None
        name, *args = kernel  # ("sinkhorn", iters, newton_steps), ("cayley", skew_pairs), ("kronecker", same_bit)
        iters, newton_steps = args if name == "sinkhorn" else (0, 0)
        table = args[0] if name in ("cayley", "kronecker") else _NO_TABLE
        n, c, m = *streams.shape[-2:], phi.shape[0]
        ops = _library_for((streams, phi, alpha, bias), (streams.shape, (m, n * c), (3,), (m,)))
        if ops is None or table.device.type != "cpu":
            return None
        return ops.read_streams(streams, phi, alpha, bias, _segment(tuple(split_sizes)), split_sizes[1], pre_eps,
                                norm_eps, MIXER_KINDS[name], iters, newton_steps, table)  # fmt: skip

    @staticmethod
    def update_streams(streams, mixer, post, branch):
        ops = _library_for((streams, mixer, post, branch), _update_shapes(streams))
        return None if ops is None else ops.update(streams, mixer, post, branch)

    @staticmethod
    def stream_update_grads(streams, mixer, post, branch, grad_out):
        ops = _library_for((streams, mixer, post, branch, grad_out), _update_shapes(streams) + (streams.shape,))
        return None if ops is None else ops.update_backward(streams, mixer, post, branch, grad_out)
