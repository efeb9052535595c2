"""transformers' in-tree mHC (DeepSeek-V4) → our sinkhorn hyper-connection, with the same numbers (SPEC §1).

``DeepseekV4HyperConnection`` computes, for n = ``hc_mult`` streams X (B, T, n, C),

    z    = UnweightedRMSNorm(flatten X) fnᵀ                       fn (2n + n², nC): rows pre | post | comb
    pre  = σ(scale₀ z_pre + base_pre) + hc_eps                    → u = Σ preᵢ Xᵢ
    post = 2σ(scale₁ z_post + base_post)
    comb = Sinkhorn(softmax(scale₂ z_comb + base_comb) + hc_eps)  P ← P / (P.sum + hc_eps), column first
    X'   = combᵀ X + post ⊗ f                                     (in DeepseekV4DecoderLayer)

which is SPEC §1 with the sinkhorn mixer in its probability-domain form. The map, parameter for parameter:

    DeepSeek-V4                          ours (HyperConnection / StreamCollapse)
    fn, base, scale                      phi, bias, alpha       (same packing and row order)
    hc_head.hc_fn, hc_base, hc_scale     phi, bias, alpha       of StreamCollapse
    hc_eps in pre (and the head)         hc_pre_eps
    hc_eps in the Sinkhorn               sinkhorn_eps, with sinkhorn_backward="unrolled" (no exact fixed point)
    hc_sinkhorn_iters                    sinkhorn_iters         (Newton polish off: it would change the numbers)
    input_norm.eps (= rms_norm_eps)      norm_eps
"""

from __future__ import annotations

import torch
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection, DeepseekV4HyperHead

from ..models.hyper_connection import HyperConnection, StreamCollapse
from ..models.mixers import build_mixer


def hyper_connection_fields_from_deepseek_v4(config: DeepseekV4Config) -> dict:
    """The ``HyperConnectionConfig`` fields that make our layers compute DeepSeek-V4's mHC."""
    if config.hc_eps < 0:
        raise ValueError(f"hc_eps must be >= 0, got {config.hc_eps}")
    return {
        "num_streams": config.hc_mult,
        "mixer": "sinkhorn",
        "dynamic": True,
        "sinkhorn_iters": config.hc_sinkhorn_iters,
        # hc_eps = 0 is plain Sinkhorn–Knopp: our log-domain form runs the same row/column rounds.
        "sinkhorn_eps": float(config.hc_eps),
        "sinkhorn_newton_steps": 0,
        "sinkhorn_backward": "unrolled",
        "hc_pre_eps": float(config.hc_eps),
        "hc_collapse": "learned",
    }


def hyper_connection_from_deepseek_v4(module: DeepseekV4HyperConnection, config: DeepseekV4Config) -> HyperConnection:
    """Our sinkhorn ``HyperConnection`` with ``module``'s weights: the same pre, post, H (= comb) and branch input."""
    fields = hyper_connection_fields_from_deepseek_v4(config)
    n, hidden = config.hc_mult, config.hidden_size
    _check_shape("fn", module.fn, ((2 + n) * n, n * hidden))
    _check_shape("base", module.base, ((2 + n) * n,))
    _check_shape("scale", module.scale, (3,))
    mixer = build_mixer(
        "sinkhorn",
        n,
        sinkhorn_iters=fields["sinkhorn_iters"],
        sinkhorn_backward=fields["sinkhorn_backward"],
        sinkhorn_eps=fields["sinkhorn_eps"],
        sinkhorn_newton_steps=fields["sinkhorn_newton_steps"],
    )
    hc = HyperConnection(hidden, mixer, dynamic=True, pre_eps=fields["hc_pre_eps"], norm_eps=module.input_norm.eps)
    _copy_parameters(hc, {"phi": module.fn, "bias": module.base, "alpha": module.scale})
    return hc


def stream_collapse_from_deepseek_v4(module: DeepseekV4HyperHead, config: DeepseekV4Config) -> StreamCollapse:
    """Our learned ``StreamCollapse`` with the weights of DeepSeek-V4's final ``hc_head``."""
    n, hidden = config.hc_mult, config.hidden_size
    _check_shape("hc_fn", module.hc_fn, (n, n * hidden))
    _check_shape("hc_base", module.hc_base, (n,))
    _check_shape("hc_scale", module.hc_scale, (1,))
    collapse = StreamCollapse(hidden, n, learned=True, pre_eps=float(module.eps), norm_eps=module.input_norm.eps)
    _copy_parameters(collapse, {"phi": module.hc_fn, "bias": module.hc_base, "alpha": module.hc_scale})
    return collapse


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"DeepSeek-V4 parameter {name} has shape {tuple(tensor.shape)}; the config implies {expected}")


@torch.no_grad()
def _copy_parameters(target: torch.nn.Module, sources: dict[str, torch.Tensor]) -> None:
    """Copy into ``target``'s float32 parameters (coefficients stay float32, SPEC §1), on the source's device."""
    device = next(iter(sources.values())).device
    target.to(device)
    for name, source in sources.items():
        getattr(target, name).copy_(source.float())


__all__ = [
    "hyper_connection_fields_from_deepseek_v4",
    "hyper_connection_from_deepseek_v4",
    "stream_collapse_from_deepseek_v4",
]
