"""Print pip constraints pinning the packages CI tests at their lowest declared versions (pyproject.toml's ">=" bounds):
``python .ci/lowest_constraints.py > constraints.txt``. The bounds are declared once, in pyproject.toml."""

import re
import sys
import tomllib
from pathlib import Path

PINNED_LOW = ("transformers", "accelerate", "peft")

dependencies = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
for name in PINNED_LOW:
    specs = [d for d in dependencies if re.match(rf"{name}\b", d)]
    lower = re.search(r">=\s*([\w.]+)", specs[0]) if specs else None
    if lower is None:
        sys.exit(f"pyproject.toml declares no '>=' lower bound for {name}")
    print(f"{name}=={lower.group(1)}")
