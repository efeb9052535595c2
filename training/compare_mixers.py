"""Compare residual mixers under one budget: same model, data, steps and seed; only ``mixer`` changes.

    python training/compare_mixers.py --output_dir runs/compare_mixers                 # all nine mixers
    python training/compare_mixers.py --mixers stiefel sinkhorn identity --max_steps 300

Each mixer is one ``training/pretrain.py`` run (settings: ``training/configs/compare_mixers.yaml`` plus any
extra ``--flag value`` given here). Writes ``results.json``, ``table.md`` and ``loss_curves.png``:

* final validation loss (nats/token) and perplexity;
* steps to reach the target training loss (trailing mean of 5 steps; default target: the worst mixer's final smoothed
  loss, so every mixer reaches it and the column ranks speed);
* training throughput (tokens/s, median over log windows — the CPU is shared, so compare within one run);
* the largest Amax gain (SPEC §4) of the composite mixer P = H_1 H_2 … H_2L over the whole depth, per token of
  a validation batch: forward gain max_i Σ_j |P_ij|, backward gain max_j Σ_i |P_ij|; the column shows the
  larger of the two, maximised over tokens. 1 means no amplification; orthogonal mixers can exceed 1 in
  this ∞-norm although their spectral norm is exactly 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_jpmhc import JPmHCForCausalLM  # noqa: E402
from hf_jpmhc.data.text import build_lm_datasets, load_tokenizer  # noqa: E402
from hf_jpmhc.models.hyper_connection import HyperConnection  # noqa: E402
from hf_jpmhc.models.mixers import MIXERS  # noqa: E402
from hf_jpmhc.outputs import atomic_path, atomic_write_text  # noqa: E402
from training import pretrain  # noqa: E402
from training.common import read_jsonl  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "compare_mixers.yaml"
SMOOTHING = 5  # trailing mean over this many logged steps, for "steps to target" and the plot


@torch.no_grad()
def amax_gain(model: JPmHCForCausalLM, input_ids: torch.Tensor) -> dict[str, float]:
    """SPEC §4 Amax gains of the depth-composite mixer P = H_1 ⋯ H_2L over the tokens of ``input_ids`` (B, T)."""
    mixers: list[torch.Tensor] = []
    hooks = [m.mixer.register_forward_hook(lambda _m, _i, out: mixers.append(out.double()))
             for m in model.modules() if isinstance(m, HyperConnection)]  # fmt: skip
    try:
        model(input_ids=input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    composite = mixers[0]
    for mixer in mixers[1:]:
        composite = composite @ mixer  # (B, T, n, n) or (n, n) for static coefficients
    forward = composite.abs().sum(-1).amax().item()  # max row sum
    backward = composite.abs().sum(-2).amax().item()  # max column sum
    return {"amax_forward": forward, "amax_backward": backward, "amax": max(forward, backward)}


def smoothed(losses: list[float]) -> list[float]:
    """Trailing mean over ``SMOOTHING`` records (shorter at the start)."""
    return [sum(losses[max(0, i + 1 - SMOOTHING) : i + 1]) / min(i + 1, SMOOTHING) for i in range(len(losses))]


def summarize(run_dir: Path) -> dict:
    records = read_jsonl(run_dir / "logs" / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    rates = sorted(r["items_per_s"] for r in records if "items_per_s" in r)
    return {
        "steps": [s for s, _ in train],
        "loss": [v for _, v in train],
        "loss_smoothed": smoothed([v for _, v in train]),
        "eval_steps": [s for s, _ in evals],
        "val_loss": [v for _, v in evals],
        "final_val_loss": evals[-1][1],
        "tokens_per_s": rates[len(rates) // 2],
    }


def steps_to(target: float, steps: list[int], curve: list[float]) -> int | None:
    return next((s for s, v in zip(steps, curve) if v <= target), None)


def plot(results: dict[str, dict], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        (line,) = ax.plot(r["steps"], r["loss_smoothed"], label=f"{name} (val {r['final_val_loss']:.3f})", lw=1.4)
        ax.plot(r["eval_steps"], r["val_loss"], "o", color=line.get_color(), ms=4)
    ax.axhline(target, color="gray", ls=":", lw=1, label=f"target {target:.3f}")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"loss (nats/token; lines: training, {SMOOTHING}-step mean; dots: validation)")
    ax.set_title("JPmHC residual mixers, same model / data / budget / seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as staging:
        fig.savefig(staging, dpi=120, format="png")
    plt.close(fig)


def table(results: dict[str, dict], target: float) -> str:
    lines = [
        f"| mixer | final val loss | val ppl | steps to train loss ≤ {target:.3f} | tokens/s | largest Amax gain (fwd / bwd) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in sorted(results.items(), key=lambda kv: kv[1]["final_val_loss"]):
        reached = r["steps_to_target"] if r["steps_to_target"] is not None else "—"
        lines.append(
            f"| {name} | {r['final_val_loss']:.4f} | {torch.tensor(r['final_val_loss']).exp().item():.2f} | {reached} | "
            f"{r['tokens_per_s']:.0f} | {r['amax']:.4g} ({r['amax_forward']:.4g} / {r['amax_backward']:.4g}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS), help=f"default: all of {', '.join(MIXERS)}")
    parser.add_argument("--output_dir", default="runs/compare_mixers")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="pretrain.py YAML shared by every run")
    parser.add_argument("--target_loss", type=float, default=None, help="default: the worst final smoothed loss")
    parser.add_argument("--report_only", action="store_true", help="redraw table and plot from output_dir/results.json")
    args, extra = parser.parse_known_args(argv)
    output_dir = Path(args.output_dir)

    if args.report_only:
        results = json.loads((output_dir / "results.json").read_text(encoding="utf-8"))["runs"]
        for r in results.values():
            r["loss_smoothed"] = smoothed(r["loss"])
        return report(results, output_dir, args.target_loss)
    results: dict[str, dict] = {}
    for mixer in args.mixers:
        run_dir = output_dir / mixer
        print(f"=== {mixer} ===", flush=True)
        pretrain.main(["--config", args.config, *extra, "--mixer", mixer, "--output_dir", str(run_dir)])
        results[mixer] = summarize(run_dir)
        model = JPmHCForCausalLM.from_pretrained(run_dir / "final").eval()
        tokenizer = load_tokenizer(str(run_dir / "final"))
        config = pretrain.parse_config(["--config", args.config, *extra])
        val = build_lm_datasets(config.dataset, tokenizer, config.block_size, text_column=config.text_column,
                                val_fraction=config.val_fraction, seed=config.seed).with_format("torch")["validation"]  # fmt: skip
        results[mixer].update(amax_gain(model, val[: config.batch_size]["input_ids"]))
    return report(results, output_dir, args.target_loss)


def report(results: dict[str, dict], output_dir: Path, target: float | None) -> dict[str, dict]:
    """Write results.json, table.md and loss_curves.png; print the table."""
    target = target or max(r["loss_smoothed"][-1] for r in results.values())
    for r in results.values():
        r["steps_to_target"] = steps_to(target, r["steps"], r["loss_smoothed"])
    atomic_write_text(output_dir / "results.json", json.dumps({"target_loss": target, "runs": results}, indent=1))
    atomic_write_text(output_dir / "table.md", table(results, target))
    plot(results, output_dir / "loss_curves.png", target)
    print(table(results, target))
    print(f"table: {(output_dir / 'table.md').resolve()}\nplot: {(output_dir / 'loss_curves.png').resolve()}")
    return results


if __name__ == "__main__":
    main()
