"""The evaluate.Metric modules of eval/metrics, loaded by path, on hand-checked cases."""

import pytest

from eval.metrics import load_metric


@pytest.fixture(scope="module")
def drop():
    return load_metric("drop_em_f1")


def drop_scores(drop, prediction, answers):
    return drop.compute(predictions=[prediction], references=[answers])


@pytest.mark.parametrize(
    "prediction, gold, em, f1",
    [
        ("1,000", ["1000"], 1.0, 1.0),  # thousands separator: "1,000" → "1000" → 1000.0
        ("1000.0", ["1,000"], 1.0, 1.0),  # numbers compare as floats
        ("The Twelve Articles", ["Twelve Articles"], 1.0, 1.0),  # articles dropped
        ("an apple.", ["apple"], 1.0, 1.0),  # articles and punctuation dropped
        ("twelve articles", ["Twelve Articles!"], 1.0, 1.0),  # case and punctuation
        ("Twelve", ["Twelve Articles"], 0.0, 0.67),  # P = 1, R = 1/2 → F1 = 2/3, rounded to 2 decimals
        ("1001", ["1,000"], 0.0, 0.0),  # a wrong number scores nothing
        ("3 touchdowns", ["3"], 0.0, 0.67),  # number matches: P = 1/2, R = 1 → 2/3
        ("4 touchdowns", ["3 touchdowns"], 0.0, 0.0),  # gold has a number the prediction lacks → 0
        ("well-known", ["well known"], 1.0, 1.0),  # hyphens split tokens
    ],
)
def test_drop_single_span(drop, prediction, gold, em, f1):
    assert drop_scores(drop, prediction, [gold]) == {"em": em, "f1": f1}


def test_drop_multi_span_answers_are_bags(drop):
    gold = [["Paris", "London"]]
    assert drop_scores(drop, ["London", "the Paris"], gold) == {"em": 1.0, "f1": 1.0}  # order-free
    # One of two gold spans found: aligned F1s (1, 0) averaged over the larger bag → 0.5; not an exact match.
    assert drop_scores(drop, ["Paris"], gold) == {"em": 0.0, "f1": 0.5}
    # A single string holding both spans is one span: its bag {paris, london} vs two one-word bags.
    # Alignment pairs it with one gold span (P = 1/2, R = 1 → 2/3), the other gets 0 → mean 1/3.
    assert drop_scores(drop, "Paris London", gold) == {"em": 0.0, "f1": 0.33}
    # Bags compare as sets of equal size: a repeated span is not the same answer.
    assert drop_scores(drop, ["Paris", "Paris"], [["Paris"]])["em"] == 0.0


def test_drop_takes_the_best_gold_answer_and_the_mean_over_questions(drop):
    golds = [["higher"], ["22.1"]]
    assert drop_scores(drop, "22.10", golds) == {"em": 1.0, "f1": 1.0}
    result = drop.compute(predictions=["higher", "no idea"], references=[golds, [["3150"]]])
    assert result == {"em": 0.5, "f1": 0.5}


def test_multiple_choice_acc_and_length_normalised_acc():
    mc = load_metric("multiple_choice")
    # Question 1: raw argmax picks choice 0; per character (-3/2 = -1.5 vs -4/8 = -0.5) picks choice 1.
    # Question 2: both pick choice 2. Ties go to the first choice (question 3).
    result = mc.compute(
        predictions=[[-3.0, -4.0], [-9.0, -8.0, -1.0], [-2.0, -2.0]],
        references=[1, 2, 1],
        choice_lengths=[[2, 8], [5, 5, 5], [3, 3]],
    )
    assert result == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="choice_lengths"):
        mc.compute(predictions=[[-1.0, -2.0]], references=[0])


@pytest.mark.parametrize(
    "continuation, target, hit",
    [
        (" (B)\n\nQ: next question", "(B)", True),
        (" The answer is (C).", "(C)", True),
        (" (A) 12/14/1937", "(B)", False),
        (" valid\n\nQ:", "valid", True),
        (" invalid", "valid", False),
        (" yes.", "yes", True),
        (" Yes", "yes", False),  # case-sensitive, as BBH's targets
        (" 12\nQ: I have", "12", True),
    ],
)
def test_bbh_exact_match_extracts_the_answer(continuation, target, hit):
    em = load_metric("bbh_exact_match")
    assert em.compute(predictions=[continuation], references=[target]) == {"exact_match": float(hit)}


def test_grid_pass_at_k():
    grids = load_metric("grid_pass_at_k")
    target = "012\n340"
    predictions = [
        ["012\n340\n\nInput:", "999\n999"],  # greedy right
        ["012\n341", "012\n340"],  # sampled attempt right
        ["012", "012\n340\n0"],  # wrong shapes
        ["012\n34O", ""],  # letter O is not a digit
    ]
    assert grids.compute(predictions=predictions, references=[target] * 4) == {"pass@1": 0.25, "pass@2": 0.5}
    with pytest.raises(ValueError, match="same number"):
        grids.compute(predictions=[["1"], ["1", "2"]], references=["1", "1"])
