"""Stability diagnostics (SPEC §4): Amax gains, empirical Jacobian spectra and the free-probability predictor.

* ``gain``             — per-site and composite Amax gains of any JPmHC model on given inputs;
* ``jacobian``         — exact (batched VJPs) and Hutchinson-probed spectra of the stream map X_L ← X_0;
* ``ensemble``         — the random ensemble the prediction is stated for (random mixers, Gaussian branches);
* ``free_probability`` — moments and density of the squared singular values, without sampling the model;
* ``plots``, ``cli``   — figures and the ``hf-jpmhc spectrum`` / ``hf-jpmhc gain`` commands.
"""

from .ensemble import HyperConnectedLinearStack, RandomHyperConnectionEnsemble, SiteCoefficients
from .free_probability import SpectrumPrediction, jacobian_density, jacobian_moments, predict_spectrum
from .gain import GainReport, composite_mixers, gain_report, model_gain, record_mixers
from .jacobian import exact_jacobian, jacobian_moment_estimates, model_stream_map, squared_singular_values

__all__ = [
    "GainReport",
    "HyperConnectedLinearStack",
    "RandomHyperConnectionEnsemble",
    "SiteCoefficients",
    "SpectrumPrediction",
    "composite_mixers",
    "exact_jacobian",
    "gain_report",
    "jacobian_density",
    "jacobian_moment_estimates",
    "jacobian_moments",
    "model_gain",
    "model_stream_map",
    "predict_spectrum",
    "record_mixers",
    "squared_singular_values",
]
