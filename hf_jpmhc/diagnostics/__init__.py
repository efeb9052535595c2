"""Stability diagnostics (SPEC §4): Amax gains, empirical Jacobian spectra and the free-probability predictor.

* ``gain``             — per-site and composite Amax gains of any JPmHC model on given inputs;
* ``dynamics``         — how the mixers H move during training (distances, norms, residuals, entropies, α) and the
                       identity-degeneration warning; ``flops`` — analytic hyper-connection FLOPs per token;
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
from .dynamics import DynamicsMonitor, DynamicsReport, IdentityDegenerationWarning, measure_dynamics
from .flops import dense_flops, hyper_connection_flops
from .free_probability import SpectrumPrediction, jacobian_density, jacobian_moments, predict_spectrum
from .gain import GainReport, composite_mixers, gain_report, model_gain, observe_reads, record_mixers
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
    "DynamicsMonitor",
    "DynamicsReport",
    "GainReport",
    "HyperConnectedLinearStack",
    "IdentityDegenerationWarning",
    "RandomHyperConnectionEnsemble",
    "RandomJPmHCEnsemble",
    "SiteCoefficients",
    "SiteMeasurement",
    "SpectrumPrediction",
    "bootstrap_relative_error",
    "composite_mixers",
    "dense_flops",
    "exact_jacobian",
    "gain_report",
    "gaussian_branch_control",
    "haar_orthogonal",
    "hyper_connection_flops",
    "jacobian_density",
    "jacobian_moment_estimates",
    "jacobian_moments",
    "measure_dynamics",
    "measure_sites",
    "model_gain",
    "model_initial_streams",
    "model_stream_map",
    "observe_reads",
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
