"""How a hyper-connection's passes over the streams run: one interface, a few backends, one lookup.

    kernels = kernels_for(kernel_backend, X)          # the one dispatch point (kernel_backend and X's device)
    u, post, H = kernels.read(hc, X)                  # u = Σ preᵢ Xᵢ, with post and H = mixer(θ)
    X = kernels.write(hc, X, f, post, H)              # X' = Hᵀ X + post ⊗ f
    h = kernels.collapse(head, X)                     # h = Σ wᵢ Xᵢ, the StreamCollapse head

Backends: ``torch`` (``TorchKernels``: the passes of ``stream_passes.py`` with their hand-written backwards),
``compiled`` (``CompiledKernels``: the same, with each pass as hf_jpmhc's C++ loop where it takes the inputs, else
inductor's code, and the mixer compiled with its backward — the fast CPU path), and ``triton`` (hf_jpmhc.ops'
``TritonKernels``, on CUDA or under TRITON_INTERPRET=1). ``auto`` is Triton on CUDA, torch elsewhere. A mixer
with maths of its own in a backend says so (``Mixer.kernel``); the hyper-connection never asks which mixer it has.
This file also runs as a checkpoint's remote code, where hf_jpmhc may not be installed: the Triton kernels and the
C++ loops are then absent, and the torch code runs in their place (inductor's for "compiled").
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from .configuration_hyper_connection import HC_KERNEL_BACKENDS, check_choice
from .stream_passes import HyperConnectionRead, StreamPasses, StreamUpdate, activate_coefficients, collapse_streams


class TorchKernels:
    """The torch backend; subclasses change ``passes`` (how each pass over the streams runs) and ``mix``."""

    name = "torch"
    passes = StreamPasses

    def prepare(self) -> None:
        """Whatever the backend needs before its first call (called when a module that uses it is made)."""

    def read(self, hc, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u (…, C), post (…, n), H (…, n, n) of the site ``hc`` (a ``HyperConnection``)."""
        if hc.phi is None:  # static coefficients: one θ per site, no batch axes
            pre, post, z_res = activate_coefficients(hc.bias.float(), hc.split_sizes, hc.pre_eps)
            return collapse_streams(streams, pre), post, hc.mixer(z_res)
        args = (streams, hc.phi, hc.alpha, hc.bias, hc.split_sizes, hc.pre_eps, hc.norm_eps)
        if not torch.is_grad_enabled():
            return self.passes.read_streams(*args, hc.mixer)
        u, post, z_res = HyperConnectionRead.apply(*args, self.passes)
        return u, post, self.mix(hc.mixer, z_res)

    def mix(self, mixer, z_res: torch.Tensor) -> torch.Tensor:
        return mixer(z_res)

    def write(self, hc, streams, branch, post, mixer) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.passes.update_streams(streams, mixer, post, branch)
        return StreamUpdate.apply(streams, mixer, post, branch, self.passes)

    def collapse(self, head, streams: torch.Tensor) -> torch.Tensor:
        """h = Σ wᵢ Xᵢ of the ``StreamCollapse`` head: a read with pre-type weights only (``head.split_sizes``)."""
        if head.phi is None:  # the fixed mean
            weights = streams.new_full((head.num_streams,), 1 / head.num_streams, dtype=torch.float32)
            return collapse_streams(streams, weights)
        args = (streams, head.phi, head.alpha.expand(3), head.bias, head.split_sizes, head.pre_eps, head.norm_eps)
        if not torch.is_grad_enabled():
            return self.passes.read_streams(*args)[0]
        return HyperConnectionRead.apply(*args, self.passes)[0]


def _native_passes():
    """hf_jpmhc's C++ loops (``hf_jpmhc.ops.cpu.NativePasses``), built and loaded; None where hf_jpmhc is not
    installed or the build failed."""
    try:
        from hf_jpmhc.ops import cpu
    except ImportError:
        return None
    return cpu.NativePasses if cpu.load() is not None else None


def _compiled_pass(name: str, native):
    """The pass ``name`` of kernel_backend="compiled": its C++ loop ``native`` where that takes the inputs (it
    returns None otherwise), else ``torch.compile`` of the torch pass. Under an enclosing ``torch.compile`` the C++
    loops (registered torch ops) are traced into the graph, and the torch pass as it is. Inputs are passed
    contiguous, and to inductor detached, so that neither the expanded first-layer streams nor autograd flags
    cause recompiles."""
    function = getattr(StreamPasses, name)
    inductor = torch.compile(function)

    def run(*args):
        args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        out = native(*args) if native is not None else None
        if out is None:
            compiling = torch.compiler.is_compiling()
            out = function(*args) if compiling else inductor(*(a.detach() if isinstance(a, torch.Tensor) else a
                                                                  for a in args))  # fmt: skip
        return out

    return staticmethod(run)


class CompiledKernels(TorchKernels):
    """kernel_backend="compiled": the torch backend with every pass compiled (``_compiled_pass``) and the mixer
    compiled with its backward (AOTAutograd: the Sinkhorn rounds, polish and implicit backward as one kernel each
    way, 2.7 → 1.2 ms per site at benchmark 1's shape). ``prepare`` builds the C++ loops when a module that uses
    this backend is made, so that traced code never builds."""

    name = "compiled"
    passes = StreamPasses  # until prepare()

    def prepare(self) -> None:
        if self.passes is StreamPasses:
            native = _native_passes()
            members = [name for name in vars(StreamPasses) if not name.startswith("_")]
            self.passes = type("CompiledPasses", (), {name: _compiled_pass(name, getattr(native, name, None))
                                                      for name in members})  # fmt: skip

    def read(self, hc, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if has_forward_hooks(hc.mixer):  # a compiled or C++ mixer would bypass them: the torch read calls it
            return KERNELS["torch"].read(hc, streams)
        return super().read(hc, streams)

    def mix(self, mixer, z_res: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return mixer(z_res)
        return _compiled_forward(type(mixer))(mixer, z_res)


def has_forward_hooks(module: torch.nn.Module) -> bool:
    """Whether forward hooks would run around ``module`` (its own or global ones)."""
    from torch.nn.modules import module as modules

    return bool(module._forward_hooks or module._forward_pre_hooks or modules._global_forward_hooks
                or modules._global_forward_pre_hooks)  # fmt: skip


@functools.cache
def _compiled_forward(mixer_class):
    """``torch.compile`` of a mixer class's forward, made once per class (autograd kept: its backward compiles too)."""
    return torch.compile(mixer_class.forward)


class RecomputeKernels:
    """mHC's recomputation (``hc_recompute``), around another backend's kernels while a ``StreamRecompute`` layer
    policy is active: each read runs under ``torch.utils.checkpoint`` (its coefficients, mixer and collapse are
    recomputed in the backward, only X is kept), and each write's output is kept as the means to rebuild it."""

    def __init__(self, kernels, policy: StreamRecompute):
        self.kernels, self.policy, self.name = kernels, policy, kernels.name

    def read(self, hc, streams):
        return checkpoint(self.kernels.read, hc, streams, use_reentrant=False)

    def write(self, hc, streams, branch, post, mixer):
        out = self.kernels.write(hc, streams, branch, post, mixer)
        return self.policy.rebuildable(out, lambda: self.kernels.write(hc, streams, branch, post, mixer))

    def collapse(self, head, streams):
        return self.kernels.collapse(head, streams)


class StreamRecompute(torch.autograd.graph.saved_tensors_hooks):
    """mHC's recomputation as a layer-level policy: ``with StreamRecompute():`` around a layer's forward.

    Per layer the streams are then stored once, as the layer's input. A mid-layer X_mid = Hᵀ X + post ⊗ f is
    n·C wide per token, and the next site's read and write would both save it for their backward: inside the block
    every saved reference to a write's output (or a view of it) is kept as its geometry only, and the backward
    rebuilds it once from that write's inputs (which the write's own backward keeps anyway), freeing it after its
    last use. Outputs never saved inside the block (the layer's output, saved by the next layer) are forgotten on
    exit, with the inputs their rebuild would have held. Every other saved tensor goes to the enclosing
    saved-tensor hooks if there are any (a memory counter, say), else is kept as usual. ``kernels_for`` wraps the
    backend's kernels in ``RecomputeKernels`` while the policy is active.
    """

    def __init__(self):
        # the hooks this context shadows, read the way torch's aot_autograd reads them
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self._outer_pack, self._outer_unpack = outer if outer is not None else (None, None)
        self._rebuild: dict[tuple, list] = {}  # storage key → [rebuild function, its result while in use, pending]
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> StreamRecompute:
        super().__enter__()
        ACTIVE_RECOMPUTE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        ACTIVE_RECOMPUTE.remove(self)
        self._rebuild = {key: entry for key, entry in self._rebuild.items() if entry[2] > 0}
        super().__exit__(*exc)

    @staticmethod
    def _key(tensor: torch.Tensor) -> tuple:
        return tensor.device, tensor.untyped_storage().data_ptr()

    def rebuildable(self, out: torch.Tensor, rebuild) -> torch.Tensor:
        self._rebuild[self._key(out)] = [rebuild, None, 0]
        return out

    def _pack(self, tensor: torch.Tensor):
        key = self._key(tensor)
        if key in self._rebuild:
            self._rebuild[key][2] += 1
            return "rebuild", key, (tensor.size(), tensor.stride(), tensor.storage_offset())
        return ("outer", self._outer_pack(tensor)) if self._outer_pack is not None else tensor

    def _unpack(self, packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if packed[0] == "outer":
            return self._outer_unpack(packed[1])
        _, key, geometry = packed
        entry = self._rebuild[key]
        if entry[1] is None:
            entry[1] = entry[0]()
        view = entry[1].as_strided(*geometry)
        entry[2] -= 1
        if entry[2] <= 0:
            entry[1] = None
        return view


ACTIVE_RECOMPUTE: list[StreamRecompute] = []  # the policies entered and not yet left, innermost last
KERNELS = {"torch": TorchKernels(), "compiled": CompiledKernels()}


def prepare_kernels(kernel_backend: str) -> None:
    """Ready the kernels of ``kernel_backend`` (invalid choices raise ValueError): done when a hyper-connection
    module is made, outside any traced code."""
    check_choice("kernel_backend", kernel_backend, HC_KERNEL_BACKENDS)
    if kernel_backend in KERNELS:
        KERNELS[kernel_backend].prepare()


def kernels_for(kernel_backend: str, tensor: torch.Tensor):
    """The kernels that run a hyper-connection's passes on ``tensor`` for ``kernel_backend`` (see the module
    docstring); invalid choices and an unavailable explicit "triton" raise ValueError."""
    kernels = KERNELS.get(kernel_backend)
    if kernels is None:
        check_choice("kernel_backend", kernel_backend, HC_KERNEL_BACKENDS)
        kernels = _triton_kernels(kernel_backend, tensor)
    return RecomputeKernels(kernels, ACTIVE_RECOMPUTE[-1]) if ACTIVE_RECOMPUTE else kernels


def _triton_kernels(kernel_backend: str, tensor: torch.Tensor):
    """hf_jpmhc.ops' Triton kernels for "triton" (or "auto" on CUDA); torch for "auto" elsewhere."""
    if kernel_backend == "auto" and not tensor.is_cuda:
        return KERNELS["torch"]
    try:  # absent where this file runs as remote code without the hf_jpmhc package
        from hf_jpmhc.ops import triton_kernels
    except ImportError:
        triton_kernels = None
    if triton_kernels is None or not triton_kernels.runs_on(tensor):
        if kernel_backend == "triton":
            raise ValueError(
                "kernel_backend='triton' needs hf_jpmhc.ops and the triton package, on CUDA tensors (or on CPU with "
                f"TRITON_INTERPRET=1), got device {tensor.device}; use kernel_backend='torch' or 'auto'"
            )
        return KERNELS["torch"]
    return triton_kernels
