"""Reference: log-domain Sinkhorn–Knopp + Newton polish with the implicit backward — from ``mixers.py``."""

from hf_jpmhc.models.mixers import (
    SinkhornImplicitFunction,
    matrix_first,
    matrix_last,
    sinkhorn_implicit_grad,
    sinkhorn_iterate,
    sinkhorn_newton,
)


def sinkhorn_reference(theta, iters: int = 20, newton_steps: int = 8):
    """P = SK(exp θ) (…, n, n), implicit backward: what ``SinkhornMixer(backward="implicit")`` runs."""
    return SinkhornImplicitFunction.apply(theta, iters, 0.0, newton_steps)


__all__ = ["sinkhorn_reference", "matrix_first", "matrix_last", "sinkhorn_iterate",
           "sinkhorn_newton", "sinkhorn_implicit_grad"]  # fmt: skip
