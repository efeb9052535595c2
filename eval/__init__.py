"""Evaluation of causal LMs (JPmHC or any other) on BBH, DROP, ARC-Easy/Challenge and ARC-AGI-1.

``python -m eval.prepare`` fills the offline cache, ``python -m eval.run`` evaluates; in Python,
``evaluate_model``. See docs/evaluation.md.
"""

from .api import evaluate_model, markdown_table, update_model_card
from .lm import CausalLM, LoglikelihoodRequest

__all__ = ["CausalLM", "LoglikelihoodRequest", "evaluate_model", "markdown_table", "update_model_card"]
