"""BBH exact match on the extracted answer (Suzgun et al., 2022, answer-only prompting).

A greedy continuation is cut at the first blank line and reduced to its answer before comparing:
for multiple-choice targets written "(A)"…"(R)" the answer is the first parenthesised capital letter
in the continuation; otherwise it is the first line, stripped, without a trailing full stop. The score
is exact string equality of that answer with the target (case-sensitive, as BBH's targets are).

Self-contained on purpose: ``evaluate.load`` copies this one file into its module cache.
"""

from __future__ import annotations

import re

import datasets
import evaluate
import numpy as np

_OPTION = re.compile(r"\(([A-Z])\)")
_DESCRIPTION = __doc__
_CITATION = """@article{suzgun2022challenging, title={Challenging BIG-Bench Tasks and Whether Chain-of-Thought Can
Solve Them}, author={Suzgun, Mirac and others}, journal={arXiv:2210.09261}, year={2022}}"""
_INPUTS = """
Args:
    predictions: list of str, the model's raw continuations.
    references: list of str, the targets ("(B)", "valid", "costume counterpart oven", ...).
Returns:
    exact_match: mean over examples in [0, 1].
Example:
    >>> em = evaluate.load("eval/metrics/bbh_exact_match")
    >>> em.compute(predictions=[" (B) 11/11/2018\\n\\nQ: ..."], references=["(B)"])
    {'exact_match': 1.0}
"""


def extract_answer(continuation: str, target: str) -> str:
    """The answer a continuation gives, in the form of ``target``."""
    text = continuation.split("\n\n", 1)[0].strip()
    if _OPTION.fullmatch(target.strip()):
        option = _OPTION.search(text)
        return f"({option.group(1)})" if option else text
    first_line = text.split("\n", 1)[0].strip()
    return first_line[:-1].rstrip() if first_line.endswith(".") else first_line


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class BbhExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            reference_urls=["https://github.com/suzgunmirac/BIG-Bench-Hard"],
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("bbh_exact_match needs at least one prediction, got none")
        hits = [extract_answer(p, r) == r.strip() for p, r in zip(predictions, references)]
        return {"exact_match": float(np.mean(hits))}
