"""kernel_backend="triton": a hyper-connection's read, write and collapse through the fused Triton kernels (the
interface of ``hf_jpmhc.models.hc_kernels``). Coefficients, collapse and stream update are one kernel each with
its backward; a mixer with a Triton kernel of its own (``Mixer.kernel("triton")``: the implicit Sinkhorn, the
iterative Cayley) runs it, any other mixer its torch forward.
"""

from __future__ import annotations

import os

import torch

from hf_jpmhc.models.cayley import skew_from_logits
from hf_jpmhc.models.stream_passes import activate_coefficients

from ._backend import device_guard, triton_available


def _sinkhorn(z_res: torch.Tensor, n: int, iters: int, newton_steps: int) -> torch.Tensor:
    from .sinkhorn.fused import sinkhorn_triton

    return sinkhorn_triton(z_res.unflatten(-1, (n, n)), iters, newton_steps)


def _cayley_iterative(z_res: torch.Tensor, n: int, basis: torch.Tensor, iters: int) -> torch.Tensor:
    from .cayley.fused import cayley_triton

    return cayley_triton(skew_from_logits(z_res, basis, n), iters)


# The mixers' Triton kernels by the names they declare in Mixer.kernel("triton"): (θ, n, *arguments) → H.
MIXER_KERNELS = {"sinkhorn": _sinkhorn, "cayley_iterative": _cayley_iterative}


class TritonKernels:
    name = "triton"

    @staticmethod
    def runs_on(tensor: torch.Tensor) -> bool:
        """Triton runs on CUDA tensors, and on CPU under ``TRITON_INTERPRET=1``."""
        return triton_available() and (tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")

    def read(self, hc, streams):
        from .collapse.fused import collapse_streams_triton

        pre, post, z_res = self._coefficients(streams, hc.phi, hc.alpha, hc.bias, hc.split_sizes, hc.pre_eps,
                                              hc.norm_eps)  # fmt: skip
        mixer = self.mix(hc.mixer, z_res)
        with device_guard(streams):
            return collapse_streams_triton(streams, pre), post, mixer

    def mix(self, mixer, z_res: torch.Tensor) -> torch.Tensor:
        kernel = mixer.kernel("triton")
        if kernel is None:
            return mixer(z_res)
        name, *args = kernel
        with device_guard(z_res):
            return MIXER_KERNELS[name](z_res, mixer.num_streams, *args)

    def write(self, hc, streams, branch, post, mixer):
        from .stream_update.fused import update_streams_triton

        with device_guard(streams):
            return update_streams_triton(streams, mixer, post, branch)

    def collapse(self, head, streams):
        from .collapse.fused import collapse_streams_triton

        if head.phi is None:  # the fixed mean
            weights = streams.new_full((head.num_streams,), 1 / head.num_streams, dtype=torch.float32)
        else:
            weights = self._coefficients(streams, head.phi, head.alpha.expand(3), head.bias, head.split_sizes,
                                         head.pre_eps, head.norm_eps)[0]  # fmt: skip
        with device_guard(streams):
            return collapse_streams_triton(streams, weights)

    @staticmethod
    def _coefficients(streams, phi, alpha, bias, split_sizes, pre_eps, norm_eps):
        if phi is None:  # static coefficients: no batch axes
            return activate_coefficients(bias.float(), split_sizes, pre_eps)
        from .coefficients.fused import hc_coefficients_triton

        with device_guard(streams):
            return hc_coefficients_triton(streams, phi, alpha, bias, split_sizes, pre_eps, norm_eps)
