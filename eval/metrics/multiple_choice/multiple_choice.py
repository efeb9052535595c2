"""Multiple-choice accuracy by log-likelihood: ``acc`` and length-normalised ``acc_norm``.

For question q with choices c_1..c_m, the model scores each continuation by its summed log-likelihood
ℓ_i = Σ_t log p(c_i,t | q, c_i,<t). ``acc`` picks argmax_i ℓ_i; ``acc_norm`` picks argmax_i ℓ_i / |c_i|,
with |c_i| the continuation's length in characters (the convention of lm-eval's ``acc_norm``, which
removes the bias toward short answers). Ties go to the first choice.

Self-contained on purpose: ``evaluate.load`` copies this one file into its module cache.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_CITATION = """@article{clark2018arc, title={Think you have Solved Question Answering? Try ARC, the AI2 Reasoning
Challenge}, author={Clark, Peter and others}, journal={arXiv:1803.05457}, year={2018}}"""
_INPUTS = """
Args:
    predictions: per question, the summed log-likelihood of each choice (list of float).
    references: per question, the index of the correct choice (int).
    choice_lengths: per question, the length in characters of each choice's continuation (list of int);
        needed for ``acc_norm``.
Returns:
    acc, acc_norm: accuracies in [0, 1].
Example:
    >>> mc = evaluate.load("eval/metrics/multiple_choice")
    >>> mc.compute(predictions=[[-3.0, -4.0]], references=[1], choice_lengths=[[2, 8]])
    {'acc': 0.0, 'acc_norm': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class MultipleChoice(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, choice_lengths=None) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("multiple_choice needs at least one prediction, got none")
        if choice_lengths is None or len(choice_lengths) != len(predictions):
            raise ValueError("multiple_choice needs choice_lengths: one list of character lengths per prediction")
        correct, correct_norm = [], []
        for loglikelihoods, gold, lengths in zip(predictions, references, choice_lengths):
            scores = np.asarray(loglikelihoods, dtype=np.float64)  # (choices,)
            lengths = np.asarray(lengths, dtype=np.float64)  # (choices,)
            if scores.shape != lengths.shape or not 0 <= gold < len(scores):
                raise ValueError(f"multiple_choice: {len(scores)} scores, {len(lengths)} lengths, gold index {gold}")
            correct.append(int(np.argmax(scores)) == gold)
            correct_norm.append(int(np.argmax(scores / np.maximum(lengths, 1.0))) == gold)
        return {"acc": float(np.mean(correct)), "acc_norm": float(np.mean(correct_norm))}
