"""DROP exact match and F1 (Dua et al., NAACL 2019, §5): answers are bags of normalised spans.

Normalisation of one span: split on spaces and hyphens; per token lower-case, drop punctuation (unless
the token is a number), write numbers as floats ("1,000" → "1000" → "1000.0"), drop the articles
a/an/the; join the non-empty tokens. EM compares the bags of normalised spans as sets of equal size;
F1 aligns predicted and gold spans one-to-one (Hungarian assignment, scipy) and averages the token-bag
F1 over the larger bag, a span's F1 counting only if it shares a number with the gold span whenever the
gold span has one. Each question takes the maximum over its gold answers, and the metric the mean.

Self-contained on purpose: ``evaluate.load`` copies this one file into its module cache.
"""

from __future__ import annotations

import re
import string

import datasets
import evaluate
import numpy as np
from scipy.optimize import linear_sum_assignment

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)

_DESCRIPTION = __doc__
_CITATION = """@inproceedings{dua2019drop, title={DROP: A Reading Comprehension Benchmark Requiring Discrete Reasoning
Over Paragraphs}, author={Dua, Dheeru and Wang, Yizhong and Dasigi, Pradeep and Stanovsky, Gabriel and Singh, Sameer
and Gardner, Matt}, booktitle={NAACL}, year={2019}}"""
_INPUTS = """
Args:
    predictions: list of str, or list of list of str (a multi-span prediction).
    references: list of gold answers per question; each gold answer is a list of spans.
Returns:
    em: mean exact match in [0, 1]; f1: mean F1 in [0, 1] (each question's F1 rounded to 2 decimals, as DROP does).
Example:
    >>> drop = evaluate.load("eval/metrics/drop_em_f1")
    >>> drop.compute(predictions=["1,000"], references=[[["1000"]]])
    {'em': 1.0, 'f1': 1.0}
"""


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def normalize_token(token: str) -> str:
    token = token.lower()
    if not is_number(token):
        token = "".join(ch for ch in token if ch not in _PUNCTUATION)
    if is_number(token):
        token = str(float(token))
    return " ".join(_ARTICLES.sub(" ", token).split())


def normalize_span(span: str) -> str:
    """DROP's answer normalisation of one span, e.g. "The 1,000 men." → "1000.0 men"."""
    tokens = (normalize_token(token) for token in re.split(" |-", span))
    return " ".join(token for token in tokens if token.strip()).strip()


def answer_to_bags(answer: str | list[str] | tuple[str, ...]) -> tuple[list[str], list[set[str]]]:
    spans = [answer] if isinstance(answer, str) else list(answer)
    normalized = [normalize_span(span) for span in spans]
    return normalized, [set(span.split()) for span in normalized]


def bag_f1(predicted: set[str], gold: set[str]) -> float:
    common = len(predicted & gold)
    precision = common / len(predicted) if predicted else 1.0
    recall = common / len(gold) if gold else 1.0
    return 0.0 if precision == 0.0 and recall == 0.0 else 2 * precision * recall / (precision + recall)


def numbers_agree(gold: set[str], predicted: set[str]) -> bool:
    """A span pair scores only if the prediction shares a number with a gold span that has numbers."""
    gold_numbers = {word for word in gold if is_number(word)}
    return not gold_numbers or bool(gold_numbers & {word for word in predicted if is_number(word)})


def em_f1(predicted: str | list[str], gold: list[str]) -> tuple[float, float]:
    """Exact match and F1 of one prediction against one gold answer (both bags of spans)."""
    predicted_spans, predicted_bags = answer_to_bags(predicted)
    gold_spans, gold_bags = answer_to_bags(gold)
    em = float(set(predicted_spans) == set(gold_spans) and len(predicted_spans) == len(gold_spans))
    scores = np.zeros((len(gold_bags), len(predicted_bags)))  # (gold spans, predicted spans)
    for i, gold_bag in enumerate(gold_bags):
        for j, predicted_bag in enumerate(predicted_bags):
            if numbers_agree(gold_bag, predicted_bag):
                scores[i, j] = bag_f1(predicted_bag, gold_bag)
    rows, cols = linear_sum_assignment(-scores)
    aligned = np.zeros(max(len(gold_bags), len(predicted_bags)))
    aligned[rows] = scores[rows, cols]
    return em, round(float(aligned.mean()), 2)


def best_em_f1(predicted: str | list[str], golds: list[list[str]]) -> tuple[float, float]:
    """Maximum EM and F1 over a question's gold answers (empty gold answers are skipped)."""
    scored = [em_f1(predicted, gold) for gold in golds if gold and gold[0].strip()]
    return (max(s[0] for s in scored), max(s[1] for s in scored)) if scored else (0.0, 0.0)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class DropEmF1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        references = datasets.Sequence(datasets.Sequence(datasets.Value("string")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": references}),
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("string")), "references": references}
                ),
            ],
            reference_urls=["https://aclanthology.org/N19-1246/"],
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        scores = np.array([best_em_f1(p, r) for p, r in zip(predictions, references)], dtype=np.float64)
        if len(scores) == 0:
            raise ValueError("drop_em_f1 needs at least one prediction, got none")
        em, f1 = scores.mean(axis=0)
        return {"em": float(em), "f1": float(f1)}
