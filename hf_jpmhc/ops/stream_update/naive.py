"""Reference: X' = Hᵀ X + post ⊗ f — the very function the model runs on the torch path."""

from hf_jpmhc.models.hyper_connection import update_streams as update_streams_reference

__all__ = ["update_streams_reference"]
