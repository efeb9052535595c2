"""Fused kernels for the hyper-connection stream ops (layout of fla / Liger-Kernel).

Per operation ``ops/<op>/``: ``naive.py`` (the float32 torch reference — imported from ``hf_jpmhc.models``,
so it is the exact code the model runs on CPU), ``fused.py`` (Triton kernels + autograd Function) and one
public function with ``kernel_backend`` in {"auto", "triton", "torch"} ("auto": Triton on CUDA, else torch).
``ops/cpu/``: the C++ loops that the models' ``kernel_backend="compiled"`` CPU training path runs (built on
first use, imported lazily by ``hf_jpmhc.models.hyper_connection.compiled``).
"""

from ._backend import KERNEL_BACKENDS, resolve_backend, triton_available
from .cayley import cayley
from .coefficients import hc_coefficients
from .collapse import collapse_streams
from .sinkhorn import sinkhorn
from .stream_update import update_streams

__all__ = ["KERNEL_BACKENDS", "resolve_backend", "triton_available", "cayley", "hc_coefficients",
           "collapse_streams", "sinkhorn", "update_streams"]  # fmt: skip
