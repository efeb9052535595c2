"""The evaluate.Metric modules of the evaluation, one directory each, loaded by path with ``evaluate.load``."""

from __future__ import annotations

from functools import cache
from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


@cache
def load_metric(name: str):
    """``evaluate.load`` of the metric module shipped in ``eval/metrics/<name>/<name>.py``."""
    import evaluate

    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"metric must be one of {available}, got {name!r}")
    return evaluate.load(str(path))
