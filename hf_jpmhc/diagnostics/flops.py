"""Analytic forward FLOPs per token of the hyper-connections (SPEC §1), beside those of the model they wrap.

A multiply and an add count one FLOP each. Per site, with n streams, hidden size C, m = 2n + r coefficients
(r the mixer's logits):

    RMS of flatten X           2nC
    z = x̃ Φᵀ                   2nC·m           (the dynamic projection; absent when ``dynamic=False``)
    u = Σ preᵢ Xᵢ              2nC
    X' = Hᵀ X + post ⊗ f       2n²C + 2nC
    θ → H                      ``MIXER_FLOPS`` (independent of C; nominal iteration counts)

and the collapse head once per model (RMS, an n-row projection, the weighted sum): 2nC(n + 2). ``dense_flops``
counts the model's own matrix products the same way, for the ratio.
"""

from __future__ import annotations

import math

from torch import nn

from ..models.mixers import build_mixer


def mixer_flops(name: str, n: int, **options) -> int:
    """Nominal FLOPs of one mixer map θ → H per token (the C-independent part of a site; small for small n)."""
    sinkhorn_iters = options.get("sinkhorn_iters", 20)
    newton = options.get("sinkhorn_newton_steps", 8)
    cayley = lambda m: 8 * m**3 // 3 + 2 * m * m  # noqa: E731  (LU of I − A/2 and the solve for I + A/2)
    m = n - 1
    p = options.get("grassmann_rank") or m
    counts = {
        "identity": 0,
        "unconstrained": n * n,
        # log-domain first round, (t − 1) rounds of row/column sums and divisions, Newton on the n×n Schur complement
        "sinkhorn": 10 * n * n + 4 * n * n * (sinkhorn_iters - 1) + newton * (2 * n**3 + 2 * n**3 // 3 + 8 * n * n),
        "permutation": 3 * math.factorial(n) + 2 * math.factorial(n) * n * n,
        "kronecker": int(math.log2(max(n, 1))) * (n * n + 1),
        "spectral": 2 * cayley(m) + 4 * m**3 + 2 * n * m * m + 2 * n * n * m + n * n,
        "transport": 8 * m * m,
        "stiefel": cayley(n),
        "grassmann": cayley(m) + cayley(p) + 2 * n * m * p + 2 * n * p * p + 2 * n * n * p + n * n,
    }
    return counts[name]


def hyper_connection_flops(config) -> int:
    """Forward FLOPs per token of ``config``'s hyper-connections: every site and the collapse head (module docstring).

    ``config`` is a ``JPmHCConfig`` or ``JPmHCViTConfig``; a config without ``num_streams`` (a plain Llama or ViT)
    has none.
    """
    n = getattr(config, "num_streams", None)
    if n is None:
        return 0
    c = config.hidden_size
    mixer = build_mixer(config.mixer, n, **config.mixer_options)
    projection = 2 * n * c * (2 * n + mixer.num_logits) if config.dynamic else 0
    site = 2 * n * c + projection + 2 * n * c + 2 * n * n * c + 2 * n * c + mixer_flops(mixer.name, n, **config.mixer_options)
    collapse = 2 * n * c * (n + 2) if config.hc_collapse == "learned" else 2 * n * c
    return 2 * config.num_hidden_layers * site + collapse


def dense_flops(model: nn.Module, context: int) -> int:
    """Forward FLOPs per token of the model's matrix products: 2 per weight of every ``nn.Linear`` (the LM head
    included, embedding lookups not), plus attention's QKᵀ and AV over ``context`` positions, 4·C·context per layer."""
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 2 * weights + 4 * model.config.hidden_size * context * model.config.num_hidden_layers
