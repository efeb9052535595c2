"""One benchmark script run from two trees of this repository (say the commits before and after a change),
alternating A B, B A, … in separate processes, each with its own C++ extension build: the ratios each run prints
(JPmHC against Llama, measured side by side inside the run) compared between the trees.

    git worktree add /tmp/before <commit>
    python benchmarks/compare_trees.py /tmp/before . --runs 3 -- benchmarks/bench_train_step.py --threads 1

Prints, for every table row of the script, the median over runs of its first ratio column (×) in each tree and
their quotient. Each run already pairs JPmHC with Llama under the same load; alternating the trees spreads
what load remains over both alike.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROW = re.compile(r"^(\S.*?)\s{2,}.*?([\d.]+)×")


def run(tree: Path, script: list[str]) -> dict[str, float]:
    """The rows of one run's tables: name → first ratio (×)."""
    env = dict(os.environ, PYTHONPATH=str(tree), TORCH_EXTENSIONS_DIR=str(tree / ".torch_extensions"))
    out = subprocess.run([sys.executable, *script], cwd=tree, env=env, capture_output=True, text=True, check=True).stdout
    return {m.group(1).strip(): float(m.group(2)) for line in out.splitlines() if (m := ROW.match(line))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs=2, type=Path, help="the two repository trees: before, after")
    parser.add_argument("--runs", type=int, default=3)
    argv = sys.argv[1:]
    if "--" not in argv:
        parser.error("give the benchmark after --, e.g. -- benchmarks/bench_memory.py")
    split = argv.index("--")
    args, script = parser.parse_args(argv[:split]), argv[split + 1 :]
    ratios: dict[Path, dict[str, list[float]]] = {tree: defaultdict(list) for tree in args.trees}
    for index in range(args.runs):
        for tree in args.trees if index % 2 == 0 else reversed(args.trees):
            for name, value in run(tree.resolve(), script).items():
                ratios[tree][name].append(value)
            print(f"run {index + 1}/{args.runs} done in {tree}", file=sys.stderr)
    before, after = args.trees
    print(f"\n{' '.join(script)}: median over {args.runs} alternating runs of each row's ratio")
    print(f"{'row':<40} {'before':>9} {'after':>9} {'after/before':>13}   runs before | after")
    for name in ratios[before]:
        old, new = ratios[before][name], ratios[after].get(name, [])
        if not new:
            continue
        quotient = statistics.median(new) / statistics.median(old)
        print(f"{name:<40} {statistics.median(old):>8.3f}× {statistics.median(new):>8.3f}× {quotient:>12.3f}   "
              f"{' '.join(f'{v:.3f}' for v in old)} | {' '.join(f'{v:.3f}' for v in new)}")  # fmt: skip


if __name__ == "__main__":
    main()
