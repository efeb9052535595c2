"""Fused kernels for the hyper-connection stream ops (layout of fla / Liger-Kernel).

Per operation ``ops/<op>/``: ``naive.py`` (a short standalone float32 torch reference, for tests to compare
against), ``fused.py`` (Triton kernels + autograd Function) and one public function with ``kernel_backend`` in
{"auto", "triton", "torch"} ("auto": Triton on CUDA; "torch": the model's own torch code, ``hf_jpmhc.models``).
``triton_backend.py`` assembles the kernels into the models' kernel interface (``kernel_backend="triton"``);
``ops/cpu/`` holds the C++ loops of the models' ``kernel_backend="compiled"`` CPU path (built on first use).
"""

from ._backend import KERNEL_BACKENDS, resolve_backend, triton_available
from .cayley import cayley
from .coefficients import hc_coefficients
from .collapse import collapse_streams
from .sinkhorn import sinkhorn
from .stream_update import update_streams
from .triton_backend import TritonKernels

triton_kernels = TritonKernels()  # what ``hf_jpmhc.models.hc_kernels.kernels_for`` runs for "triton"

__all__ = ["KERNEL_BACKENDS", "resolve_backend", "triton_available", "cayley", "hc_coefficients",
           "collapse_streams", "sinkhorn", "update_streams", "triton_kernels"]  # fmt: skip
