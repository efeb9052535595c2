"""Reference: the iterative Cayley transform with its exact backward — from ``mixers.py``."""

from hf_jpmhc.models.mixers import CayleyIterativeFunction


def cayley_reference(skew, iters: int = 12):
    """Cayley(A) = (I − A/2)⁻¹(I + A/2) by the fixed point Y ← I + (A/2)(I + Y): ``StiefelMixer(method="iterative")``."""
    return CayleyIterativeFunction.apply(skew, iters)


__all__ = ["cayley_reference"]
