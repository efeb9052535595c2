"""Stability diagnostics (SPEC §4): Amax gains, empirical Jacobian spectra and the free-probability predictor.

* ``gain``             — per-site and composite Amax gains of any JPmHC model on given inputs;
* ``jacobian``         — exact (batched VJPs) and Hutchinson-probed spectra of the stream map X_L ← X_0, and the
                       per-site branch gains of an LM that the predictor takes as input;
* ``ensemble``         — the random ensembles: random mixers with Gaussian linear branches, or real JPmHC LMs;
* ``free_probability`` — moments and density of the squared singular values, without sampling the model;
* ``plots``, ``cli``   — figures and the ``hf-jpmhc spectrum`` / ``hf-jpmhc gain`` commands.
"""

from .ensemble import (
    HyperConnectedLinearStack,
    RandomHyperConnectionEnsemble,
    RandomJPmHCEnsemble,
    SiteCoefficients,
    bootstrap_relative_error,
    gaussian_branch_control,
    haar_orthogonal,
    paired_relative_error,
    rotated_branch_control,
    standard_error,
)
from .free_probability import SpectrumPrediction, jacobian_density, jacobian_moments, predict_spectrum
from .gain import GainReport, composite_mixers, gain_report, model_gain, record_mixers
from .jacobian import (
    SiteMeasurement,
    exact_jacobian,
    jacobian_moment_estimates,
    measure_sites,
    model_initial_streams,
    model_stream_map,
    site_product,
    squared_singular_values,
    token_spectra,
    token_stream_map,
)

__all__ = [
    "GainReport",
    "HyperConnectedLinearStack",
    "RandomHyperConnectionEnsemble",
    "RandomJPmHCEnsemble",
    "SiteCoefficients",
    "SiteMeasurement",
    "SpectrumPrediction",
    "bootstrap_relative_error",
    "composite_mixers",
    "exact_jacobian",
    "gain_report",
    "gaussian_branch_control",
    "haar_orthogonal",
    "jacobian_density",
    "jacobian_moment_estimates",
    "jacobian_moments",
    "measure_sites",
    "model_gain",
    "model_initial_streams",
    "model_stream_map",
    "paired_relative_error",
    "predict_spectrum",
    "record_mixers",
    "rotated_branch_control",
    "site_product",
    "squared_singular_values",
    "standard_error",
    "token_spectra",
    "token_stream_map",
]
