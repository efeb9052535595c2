"""The evaluation tasks: ARC-Easy/Challenge, DROP, BBH(-style) and ARC-AGI-1, by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskResult:
    """What one task reports: its metrics, the data it used, and the per-example records."""

    task: str
    dataset: str  # a Hub name, or a description of the offline set
    source: str  # "hub" or the cache file/directory the rows came from
    num_examples: int
    num_fewshot: int | None
    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)


def few_shot_prefix(task, split: str, num_fewshot: int, render: Callable[[dict], str], **load_kwargs) -> str:
    """The first ``num_fewshot`` rows of ``task``'s ``split``, each rendered with its answer and followed by a blank
    line ("" for zero shots); asking for more shots than the split has is a ValueError."""
    if not num_fewshot:
        return ""
    shots, _ = task.load(split, **load_kwargs)
    if num_fewshot > len(shots):
        raise ValueError(f"num_fewshot for {task.name} must be ≤ {len(shots)}, got {num_fewshot}")
    return "".join(f"{render(shot)}\n\n" for shot in shots[:num_fewshot])


def get_task(name: str):
    """The task module's ``Task`` object for ``name``."""
    from . import arc, arc_agi, bbh, drop

    tasks = {
        "arc_easy": arc.ArcTask("arc_easy"),
        "arc_challenge": arc.ArcTask("arc_challenge"),
        "drop": drop.DropTask(),
        "bbh": bbh.BbhTask(),
        "arc_agi": arc_agi.ArcAgiTask(),
    }
    if name not in tasks:
        raise ValueError(f"tasks must be a comma-separated subset of {sorted(tasks)}, got {name!r}")
    return tasks[name]


TASK_NAMES = ("bbh", "drop", "arc_easy", "arc_challenge", "arc_agi")
