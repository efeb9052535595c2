"""``python -m eval.run``: evaluate a causal LM checkpoint on BBH, DROP, ARC and ARC-AGI.

    python -m eval.run --model DIR --tasks bbh,drop,arc_easy,arc_challenge,arc_agi \\
        [--limit N] [--num-fewshot K] [--batch-size B] [--output DIR] [--update-model-card]

Prints a markdown table and, with ``--output``, writes ``results.json``, ``results.md`` and the
per-example ``samples_<task>.jsonl``. Data come from the Hub or, offline, from ``python -m eval.prepare``.
"""

from __future__ import annotations

import argparse

import torch

from hf_jpmhc.errors import user_errors

from .api import evaluate_model, markdown_table
from .data import SOURCES
from .prepare import parse_tasks
from .tasks import TASK_NAMES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROG = "python -m eval.run"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub name of a causal LM")
    parser.add_argument("--tasks", default=",".join(TASK_NAMES), help=f"comma-separated subset of {','.join(TASK_NAMES)}")
    parser.add_argument("--limit", type=positive_int, default=None, help="examples per task (per subtask for bbh)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="shots (default: arc 0, drop 3, bbh 3)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--output", default=None, help="directory for results.json, results.md, samples_*.jsonl")
    parser.add_argument("--update-model-card", action="store_true", help="write eval_results into DIR/README.md")
    parser.add_argument("--data-dir", default=None, help="offline cache (default: $HF_JPMHC_CACHE/eval)")
    parser.add_argument("--source", choices=SOURCES, default="auto", help="Hub first (auto), Hub only, or cache only")
    parser.add_argument("--attempts", type=positive_int, default=2, help="k of ARC-AGI pass@k (greedy + k-1 sampled)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--max-length", type=positive_int, default=None, help="context length (default: the model's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser


@user_errors(PROG)
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    report = evaluate_model(
        args.model,
        parse_tasks(args.tasks),
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        output_dir=args.output,
        update_card=args.update_model_card,
        data_dir=args.data_dir,
        source=args.source,
        seed=args.seed,
        attempts=args.attempts,
        max_length=args.max_length,
        dtype=DTYPES[args.dtype],
        trust_remote_code=args.trust_remote_code,
    )
    print(markdown_table(report["results"]))
    return report


if __name__ == "__main__":
    main()
