"""ARC-AGI scoring: exact match of the whole output grid, pass@1 and pass@k over k attempts.

A grid is written one row per line, one digit 0–9 per cell ("01\\n20" is [[0, 1], [2, 0]]). An attempt is
parsed from the start of the model's continuation up to the first blank line; every row must consist of
digits only and the grid must equal the target cell for cell (same shape, same colours). pass@1 scores the
first attempt (greedy), pass@k counts a test output as solved when any of its k attempts is exact — the
ARC Prize scoring with k = 2.

Self-contained on purpose: ``evaluate.load`` copies this one file into its module cache.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_CITATION = """@article{chollet2019measure, title={On the Measure of Intelligence}, author={Chollet, François},
journal={arXiv:1911.01547}, year={2019}}"""
_INPUTS = """
Args:
    predictions: per test output, the raw continuations of the k attempts (list of str, greedy first).
    references: per test output, the target grid as text (str).
Returns:
    pass@1 and pass@k (k = the number of attempts) in [0, 1].
Example:
    >>> grids = evaluate.load("eval/metrics/grid_pass_at_k")
    >>> grids.compute(predictions=[["01\\n21", "01\\n20\\n\\nInput:"]], references=["01\\n20"])
    {'pass@1': 0.0, 'pass@2': 1.0}
"""


def parse_grid(text: str) -> list[str] | None:
    """Rows of the grid at the start of ``text``, or None when it is not a digit grid."""
    rows = text.strip("\n").split("\n\n", 1)[0].split("\n")
    rows = [row.strip() for row in rows]
    if not rows or not all(row.isdigit() and row.isascii() for row in rows):
        return None
    return rows


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class GridPassAtK(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("string")), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/fchollet/ARC-AGI"],
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("grid_pass_at_k needs at least one prediction, got none")
        attempts = {len(p) for p in predictions}
        if len(attempts) != 1 or 0 in attempts:
            raise ValueError(f"grid_pass_at_k needs the same number (≥ 1) of attempts per output, got {sorted(attempts)}")
        (k,) = attempts
        hits = np.array([[parse_grid(a) == parse_grid(r) for a in p] for p, r in zip(predictions, references)])
        return {"pass@1": float(hits[:, 0].mean()), f"pass@{k}": float(hits.any(axis=1).mean())}
