"""Python API: ``evaluate_model(model_dir, tasks=[...])`` → results dict, JSON + markdown, model card.

```python
from eval import evaluate_model

results = evaluate_model("path/to/checkpoint", tasks=["arc_easy", "drop"], limit=50, output_dir="eval_out")
results["results"]["arc_easy"]["metrics"]  # {'acc': ..., 'acc_norm': ...}
```

Any causal LM directory works (a plain Llama too): ``import hf_jpmhc`` registers JPmHC with the Auto
classes. Runs are deterministic: the same arguments give the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from hf_jpmhc.outputs import atomic_write_text

from .lm import CausalLM
from .tasks import TASK_NAMES, TaskResult, get_task

# Hub dataset ids and task types for the model card's model-index.
CARD_DATASETS = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "ARC-Easy", "test", "multiple-choice"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "ARC-Challenge", "test", "multiple-choice"),
    "drop": ("EleutherAI/drop", None, "DROP", "validation", "question-answering"),
    "bbh": ("lukaemon/bbh", None, "BBH", "test", "text-generation"),
    "arc_agi": ("arc-agi-1", None, "ARC-AGI-1 evaluation", "evaluation", "text-generation"),
}


def markdown_table(results: dict[str, dict]) -> str:
    """One row per (task, metric): task, dataset, examples, shots, metric, value (in %)."""
    lines = ["| task | dataset | n | shots | metric | value |", "|---|---|---:|---:|---|---:|"]
    for name, result in results.items():
        shots = "-" if result["num_fewshot"] is None else result["num_fewshot"]
        for metric, value in result["metrics"].items():
            lines.append(f"| {name} | {result['dataset']} | {result['num_examples']} | {shots} | {metric} | {100 * value:.2f} |")
    return "\n".join(lines) + "\n"


def eval_results_for_card(results: dict[str, dict]):
    """huggingface_hub ``EvalResult`` entries (values in %) for the model card's model-index."""
    from huggingface_hub import EvalResult

    entries = []
    for name, result in results.items():
        dataset_type, config, dataset_name, split, task_type = CARD_DATASETS[name]
        offline = result["source"] != "hub"
        if result["dataset"].startswith("BBH-style"):
            dataset_type = "bbh-style"  # not lukaemon/bbh: other items from the same BIG-bench pools
        for metric, value in result["metrics"].items():
            entries.append(EvalResult(
                task_type=task_type,
                dataset_type=dataset_type,
                dataset_name=result["dataset"] if offline else dataset_name,
                dataset_config=config,
                dataset_split=split,
                dataset_args={"num_fewshot": result["num_fewshot"], "limit": result["num_examples"]},
                metric_type=metric,
                metric_name=f"{metric} ({result['num_examples']} examples)",
                metric_value=round(100 * value, 2),
            ))  # fmt: skip
    return entries


def update_model_card(model_dir: str | Path, results: dict[str, dict]) -> Path:
    """Write ``results`` into ``model_dir/README.md``'s eval_results (replacing same task/metric entries)."""
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(model_dir) / "README.md"
    new = eval_results_for_card(results)
    if path.is_file():
        card = ModelCard.load(path)
    else:
        card = ModelCard.from_template(ModelCardData(library_name="transformers"), model_id=Path(model_dir).name)
    replaced = {(e.dataset_type, e.dataset_config, e.metric_type) for e in new}
    kept = [e for e in card.data.eval_results or [] if (e.dataset_type, e.dataset_config, e.metric_type) not in replaced]
    card.data.eval_results = kept + new
    card.data.model_name = card.data.model_name or Path(model_dir).resolve().name
    atomic_write_text(path, str(card))
    return path


def evaluate_model(
    model: str | Path | CausalLM,
    tasks: Sequence[str] = TASK_NAMES,
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    output_dir: str | Path | None = None,
    update_card: bool = False,
    data_dir: str | Path | None = None,
    source: str = "auto",
    seed: int = 1234,
    attempts: int = 2,
    max_length: int | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> dict:
    """Evaluate ``model`` (a checkpoint directory, Hub name, or ``CausalLM``) on ``tasks``.

    ``limit`` caps the examples per task (per subtask for BBH, test outputs for ARC-AGI); ``num_fewshot``
    overrides each task's default (ARC 0, DROP 3, BBH 3; not for ARC-AGI); ``attempts`` is ARC-AGI's k.
    Writes ``results.json``, ``results.md`` and ``samples_<task>.jsonl`` to ``output_dir`` when given,
    and the model card's eval_results when ``update_card`` (needs a checkpoint directory).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot must be ≥ 0 or None, got {num_fewshot}")
    tasks = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    task_objects = [get_task(name) for name in tasks]  # validates the names first
    if update_card and not (isinstance(model, (str, Path)) and Path(model).is_dir()):
        raise ValueError("update_card needs model to be a local checkpoint directory")
    lm = model if isinstance(model, CausalLM) else CausalLM.from_pretrained(
        model, dtype=dtype, trust_remote_code=trust_remote_code, batch_size=batch_size, max_length=max_length)
    torch.manual_seed(seed)
    per_task: dict[str, TaskResult] = {}
    for task in task_objects:
        task_fewshot = None if task.name == "arc_agi" else num_fewshot
        per_task[task.name] = task.run(lm, limit=limit, num_fewshot=task_fewshot, data_dir=Path(data_dir) if data_dir else None,
                                       source=source, seed=seed, attempts=attempts)
    results = {name: {k: v for k, v in dataclasses.asdict(r).items() if k not in ("task", "samples")}
               for name, r in per_task.items()}
    report = {
        "model": str(model) if not isinstance(model, CausalLM) else type(model.model).__name__,
        "model_type": lm.model.config.model_type,
        "arguments": {"tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot, "batch_size": lm.batch_size,
                      "seed": seed, "attempts": attempts, "max_length": lm.max_length, "dtype": str(dtype), "source": source},
        "results": results,
        "versions": _versions(),
    }
    if output_dir is not None:
        out = Path(output_dir)
        atomic_write_text(out / "results.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(out / "results.md", markdown_table(results))
        for name, r in per_task.items():
            atomic_write_text(out / f"samples_{name}.jsonl", "".join(json.dumps(s) + "\n" for s in r.samples))
    if update_card:
        update_model_card(model, results)
    return report


def _versions() -> dict[str, str]:
    import evaluate
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "evaluate": evaluate.__version__}
    try:
        import hf_jpmhc

        versions["hf_jpmhc"] = hf_jpmhc.__version__
    except ImportError:
        pass
    return versions
