"""Reference: pre, post, θ_res from the streams — the very function the model runs on the torch path."""

from hf_jpmhc.models.hyper_connection import dynamic_coefficients as hc_coefficients_reference

__all__ = ["hc_coefficients_reference"]
