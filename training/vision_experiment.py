"""Plain ViT vs JPmHC-ViTs on the same budget: train each with ``training/finetune_vision.py``, compare test accuracy.

    python training/vision_experiment.py --output_dir runs/vision_experiment            # ViT, stiefel, sinkhorn (n=4)
    python training/vision_experiment.py --mixers stiefel sinkhorn grassmann --max_steps 400

Every arm gets the same data order, seed, steps, batch, optimiser and schedule, and — because ``--model jpmhc``
converts the seed's ViT function-preservingly — the same initial weights and function. Each arm runs in its own
process (``finetune_vision.py``, resumable on its own); an arm whose ``results.json`` exists is not re-run.
Writes ``results.json``, ``results.md`` and ``loss.png`` (training loss per step) into ``output_dir``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_jpmhc.outputs import atomic_path, atomic_write_text  # noqa: E402
from training.common import read_jsonl  # noqa: E402

FINETUNE = Path(__file__).resolve().parent / "finetune_vision.py"
# The shared budget: a 4-layer, hidden-64 ViT on 28×28 images cut into 4×4 = 16 patches of 7×7 pixels, 150 steps of
# 32 images (4,800 images, 8% of a Fashion-MNIST epoch), evaluated on the first 2,000 test images — sized for a shared
# 2-core CPU; raise --max_steps and --eval_limit (0 = all) where there is more compute.
BUDGET = dict(patch_size=7, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
              batch_size=32, learning_rate=2e-3, warmup_steps=15, max_steps=150, eval_limit=2000, log_every=10)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/vision_experiment")
    parser.add_argument("--mixers", nargs="+", default=["stiefel", "sinkhorn"], help="JPmHC arms beside the plain ViT")
    parser.add_argument("--num_streams", type=int, default=4)
    parser.add_argument("--dataset", default="auto", help="'auto', 'fashion_mnist', 'mnist_5k' or a Hub dataset")
    parser.add_argument("--seed", type=int, default=0)
    for name, default in BUDGET.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    return parser.parse_args(argv)


def arms(args: argparse.Namespace) -> dict[str, list[str]]:
    """Arm name → its finetune_vision.py flags."""
    shared = [f"--{name}={getattr(args, name)}" for name in BUDGET] + [f"--seed={args.seed}", f"--dataset={args.dataset}"]
    runs = {"vit": ["--model=vit", *shared]}
    for mixer in args.mixers:
        runs[f"jpmhc-{mixer}-n{args.num_streams}"] = ["--model=jpmhc", f"--mixer={mixer}",
                                                      f"--num_streams={args.num_streams}", *shared]  # fmt: skip
    return runs


def run_arm(name: str, flags: list[str], output_dir: Path) -> dict:
    arm_dir = output_dir / name
    results = arm_dir / "results.json"
    if not results.is_file():
        print(f"=== {name}: python {FINETUNE.name} {' '.join(flags)}", flush=True)
        subprocess.run([sys.executable, str(FINETUNE), f"--output_dir={arm_dir}", "--resume", *flags], check=True)
    return json.loads(results.read_text(encoding="utf-8"))


def markdown_table(results: dict[str, dict]) -> str:
    header = "| arm | parameters | HC parameters | test accuracy | test loss | train time (min) | images/s |\n|---|---:|---:|---:|---:|---:|---:|"
    rows = [
        f"| {name} | {r['parameters']:,} | {r['hc_parameters']:,} | {r['test_accuracy']:.4f} | {r['test_loss']:.4f} | "
        f"{r['train_seconds'] / 60:.1f} | {r['images'] / r['train_seconds']:.0f} |"
        for name, r in results.items()
    ]
    return "\n".join([header, *rows])


def plot_losses(output_dir: Path, names: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        records = [r for r in read_jsonl(output_dir / name / "logs" / "metrics.jsonl") if "loss" in r]
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=name)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss (nats/image)")
    ax.set_title("Plain ViT vs JPmHC-ViT, same seed and budget")
    ax.legend()
    fig.tight_layout()
    path = output_dir / "loss.png"
    with atomic_path(path) as staging:
        fig.savefig(staging, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {name: run_arm(name, flags, output_dir) for name, flags in arms(args).items()}
    table = markdown_table(results)
    budget = ", ".join(f"{k}={getattr(args, k)}" for k in BUDGET)
    text = f"Dataset: {results['vit']['dataset']}; seed {args.seed}; {budget}.\n\n{table}\n"
    atomic_write_text(output_dir / "results.md", text)
    atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    plot = plot_losses(output_dir, list(results))
    print(f"\n{text}\nwritten: {output_dir / 'results.md'}, {output_dir / 'results.json'}, {plot}")
    return results


if __name__ == "__main__":
    main()
