"""Reference: u = Σ_i w_i X_i in float32 — the very function the model runs on the torch path."""

from hf_jpmhc.models.hyper_connection import collapse_streams as collapse_streams_reference

__all__ = ["collapse_streams_reference"]
