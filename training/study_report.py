"""The report of a study (``training/study.py``): from ``results.json`` alone, statistics over seeds, markdown tables,
small PNG figures, and the per-run summary merged into the docs JSON.

    python training/study.py report runs/study/mixers --docs docs

Statistics. Per arm and setting, over its seeds: the mean and a 95% interval, mean ± t₀.₉₇₅,ₖ₋₁ · sd/√k (Student's t,
k seeds); "Δ vs <reference>": the same interval for the per-seed difference to the reference arm — runs of one seed
share the data order (and, for the language models, every non-hyper-connection initial weight), so the paired
interval is the sharper test. An interval that contains 0 means "not separable from seed noise at this scale".

Steps to target: the first logged step at which the training loss (trailing mean over ``SMOOTHING`` records) is at
or below the target loss — or, for a target accuracy, the first evaluation at or above it, counted in epochs. Unless
the spec fixes it, the target is the worst run's final value in the setting, so that every run reaches it and the
column ranks speed.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from training.common import atomic_write_text

SMOOTHING = 5  # trailing mean over this many logged steps (the loss curves and "steps to target")
SUMMARY_EXCLUDE = ("curves",)  # kept in results.json, left out of the docs JSON
FIGURE_DPI = 80


# ----------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------


def smoothed(values: list[float]) -> list[float]:
    """Trailing mean over ``SMOOTHING`` values (shorter at the start)."""
    return [statistics.fmean(values[max(0, i + 1 - SMOOTHING) : i + 1]) for i in range(len(values))]


def interval(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95% Student-t interval); the half-width is None for fewer than two values."""
    from scipy.stats import t

    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def by_group(runs: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """setting → arm → runs (in seed order), arms in the order they first appear."""
    groups: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for run in runs:
        groups[run["setting"]].setdefault(run["arm"], []).append(run)
    return groups


def fill_targets(spec: dict, runs: list[dict]) -> dict[str, float]:
    """Set each run's ``steps_to_target`` (and ``epochs_to_target`` for an accuracy target); return setting → target."""
    metric = (spec.get("target") or {}).get("metric", "train_loss")
    fixed = (spec.get("target") or {}).get("value")
    targets = {}
    for setting, arms in by_group(runs).items():
        if metric == "train_loss":
            finals = [smoothed(r["curves"]["loss"])[-1] for rs in arms.values() for r in rs]
            target = fixed if fixed is not None else max(v for v in finals if math.isfinite(v))
            for r in (r for rs in arms.values() for r in rs):
                curve = smoothed(r["curves"]["loss"])
                r["steps_to_target"] = next((s for s, v in zip(r["curves"]["step"], curve) if v <= target), None)
        else:
            finals = [r["accuracy"] for rs in arms.values() for r in rs]
            target = fixed if fixed is not None else min(finals)
            for r in (r for rs in arms.values() for r in rs):
                curves = r["curves"]
                reached = next((s for s, a in zip(curves["eval_step"], curves["accuracy"]) if a >= target), None)
                r["steps_to_target"] = reached
                r["epochs_to_target"] = reached / spec["epoch_steps"] if reached and spec.get("epoch_steps") else None
        targets[setting] = target
    return targets


def arm_statistics(arms: dict[str, list[dict]], reference: str | None) -> dict[str, dict]:
    """Per arm: intervals of the final numbers, paired differences to ``reference``, costs and H dynamics."""
    stats = {}
    ref = {r["seed"]: r for r in arms.get(reference, [])} if reference else {}
    for arm, runs in arms.items():
        s = {"seeds": len(runs), "mixer": runs[0]["mixer"], "run0": runs[0]}
        s["val"] = interval([r["final_val_loss"] for r in runs])
        paired = [r["final_val_loss"] - ref[r["seed"]]["final_val_loss"] for r in runs if r["seed"] in ref]
        s["delta"] = interval(paired) if arm != reference and paired else None
        if "accuracy" in runs[0]:
            s["accuracy"] = interval([r["accuracy"] for r in runs])
            paired = [r["accuracy"] - ref[r["seed"]]["accuracy"] for r in runs if r["seed"] in ref]
            s["delta_accuracy"] = interval(paired) if arm != reference and paired else None
        reached = [r["steps_to_target"] for r in runs if r.get("steps_to_target") is not None]
        s["to_target"] = (statistics.fmean(reached) if reached else None, len(reached))
        epochs = [r["epochs_to_target"] for r in runs if r.get("epochs_to_target") is not None]
        s["epochs_to_target"] = statistics.fmean(epochs) if epochs else None
        amax = [r["max_amax"] for r in runs if r.get("max_amax") is not None]
        s["max_amax"] = max(amax) if amax else None
        h = [r["final_h_distance"] for r in runs if r.get("final_h_distance") is not None]
        s["h_distance"] = statistics.fmean(h) if h else None
        s["unmoved"] = [r.get("unmoved_sites") for r in runs]
        s["step_seconds"] = statistics.median(r["step_seconds"] for r in runs)
        s["step_cpu_seconds"] = statistics.median(r["step_cpu_seconds"] for r in runs)
        s["drop_last_fifth"] = statistics.fmean(_late_drop(r) for r in runs)
        if "spectrum" in runs[0]:
            for key in ("m1", "spread", "random_m1", "random_spread"):
                s[key] = statistics.fmean(r["spectrum"][key] for r in runs)
        stats[arm] = s
    return stats


def _late_drop(run: dict) -> float:
    """How much the smoothed training loss fell over the last fifth of the run (> 0: still falling)."""
    curve, steps = smoothed(run["curves"]["loss"]), run["curves"]["step"]
    at = next(i for i, s in enumerate(steps) if s >= 0.8 * steps[-1])
    return curve[at] - curve[-1]


def plateaued(runs: list[dict], evaluations: int = 3, tolerance: float = 0.003) -> bool:
    """Whether the seed-mean test accuracy moved less than ``tolerance`` over the last ``evaluations`` evaluations."""
    curves = [r["curves"]["accuracy"][-evaluations:] for r in runs]
    mean = [statistics.fmean(values) for values in zip(*curves)]
    return max(mean) - min(mean) < tolerance


# ----------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------


def _pm(value: tuple[float, float | None] | None, digits: int = 4, scale: float = 1.0) -> str:
    if value is None:
        return "—"
    mean, half = value
    return f"{mean * scale:.{digits}f}" + (f" ± {half * scale:.{digits}f}" if half is not None else "")


def _num(value, fmt: str = ".3g") -> str:
    return "—" if value is None else format(value, fmt)


def setting_table(spec: dict, stats: dict[str, dict], target: float) -> str:
    """One markdown table: a row per arm."""
    vision = "accuracy" in next(iter(stats.values()))
    reference = spec.get("reference")
    header = ["arm", "mixer", "seeds"]
    if vision:
        header += ["test accuracy % (95% CI)", f"Δ acc vs {reference}", f"epochs to {target * 100:.2f}%", "test loss"]
    else:
        header += ["final val loss (95% CI)", f"Δ vs {reference} (paired)", f"steps to train loss ≤ {target:.4f}",
                   "loss drop, last 20%"]  # fmt: skip
    header += ["max Amax", "final ‖H − H₀‖_F", "s/step (wall / CPU)", "HC MFLOP/token (% of dense)"]
    spectrum = "spread" in next(iter(stats.values()))
    if spectrum:
        header += ["predicted m₁ / m₂/m₁² at init", "… with random H"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, s in stats.items():
        run0 = s["run0"]
        reached, count = s["to_target"]
        row = [arm, s["mixer"], str(s["seeds"])]
        if vision:
            epochs = "—" if s["epochs_to_target"] is None else f"{s['epochs_to_target']:.1f} ({count}/{s['seeds']})"
            row += [_pm(s["accuracy"], 2, 100), _pm(s["delta_accuracy"], 2, 100), epochs, _pm(s["val"], 4)]
        else:
            steps = "—" if reached is None else f"{reached:.0f} ({count}/{s['seeds']})"
            row += [_pm(s["val"]), _pm(s["delta"]), steps, f"{s['drop_last_fifth']:.3f}"]
        hc_flops, dense = run0["hc_flops_per_token"], run0["dense_flops_per_token"]
        row += [_num(s["max_amax"], ".4g"), _num(s["h_distance"], ".3g"),
                f"{s['step_seconds']:.3f} / {s['step_cpu_seconds']:.3f}",
                f"{hc_flops / 1e6:.3g} ({100 * hc_flops / dense:.0f}%)" if hc_flops else "0"]  # fmt: skip
        if spectrum:
            row += [f"{s['m1']:.4g} / {s['spread']:.4g}", f"{s['random_m1']:.4g} / {s['random_spread']:.4g}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# The pairs the JPmHC paper's claims compare (orthogonal vs bistochastic, Grassmann between them), first minus second.
CLAIM_CONTRASTS = (("stiefel", "sinkhorn"), ("grassmann", "sinkhorn"), ("stiefel", "grassmann"))


def contrast_table(arms: dict[str, list[dict]]) -> str | None:
    """Paired differences (same seed) between the arms of ``CLAIM_CONTRASTS`` present in the setting: final
    loss (or accuracy) and steps to target, each with its 95% interval, and whether the interval excludes 0."""
    vision = "accuracy" in next(iter(arms.values()))[0]
    key, what = ("accuracy", "Δ test accuracy %") if vision else ("final_val_loss", "Δ final val loss")
    scale, digits = (100, 2) if vision else (1, 4)
    lines = []
    for first, second in (pair for pair in CLAIM_CONTRASTS if set(pair) <= arms.keys()):
        a, b = ({r["seed"]: r for r in arms[arm]} for arm in (first, second))
        seeds = sorted(a.keys() & b.keys())
        delta = interval([a[s][key] - b[s][key] for s in seeds])
        steps = interval([a[s]["steps_to_target"] - b[s]["steps_to_target"] for s in seeds
                          if a[s].get("steps_to_target") is not None and b[s].get("steps_to_target") is not None])
        mean, half = delta
        better = first if (mean > 0) == vision else second
        verdict = "—" if half is None else ("not separable from seed noise" if abs(mean) <= half else f"{better} better")
        lines.append(f"| {first} − {second} | {len(seeds)} | {_pm(delta, digits, scale)} | {_pm(steps, 0)} | {verdict} |")
    if not lines:
        return None
    header = f"| contrast | seeds | {what} (95% CI) | Δ steps to target | verdict |\n|---|---|---|---|---|"
    return "\n".join([header, *lines])


# ----------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    staging = path.with_name(f".tmp-{path.name}")
    fig.savefig(staging, dpi=FIGURE_DPI, format="png")
    staging.replace(path)
    _pyplot().close(fig)
    return path


def _panels(groups: dict, width: float = 4.6, height: float = 3.4):
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(width * len(groups), height), squeeze=False)
    return fig, list(axes[0])


def _colors(arms: list[str]) -> dict[str, tuple]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if len(arms) <= 10 else "tab20")
    return {arm: cmap(i % cmap.N) for i, arm in enumerate(arms)}


def _band(ax, steps, curves, color, label):
    """Mean over seeds as a line, min..max over seeds as a band."""
    length = min(len(c) for c in curves)
    columns = list(zip(*(c[:length] for c in curves)))
    ax.plot(steps[:length], [statistics.fmean(c) for c in columns], color=color, lw=1.2, label=label)
    if len(curves) > 1:
        ax.fill_between(steps[:length], [min(c) for c in columns], [max(c) for c in columns], color=color, alpha=0.2, lw=0)


def plot_curves(groups: dict, key: str, path: Path, ylabel: str, *, log: bool = False, smooth: bool = False) -> Path | None:
    """``key``'s curve (from each run's ``curves``) per arm and setting: seed mean with a min–max band."""
    fig, axes = _panels(groups)
    arms = list(dict.fromkeys(arm for g in groups.values() for arm in g))
    colors, drawn = _colors(arms), False
    for ax, (setting, group) in zip(axes, groups.items()):
        lows, highs = [], []
        for arm, runs in group.items():
            curves = [r["curves"][key] for r in runs]
            if any(v is None for c in curves for v in c):
                continue  # a plain model has no H
            curves = [smoothed(c) if smooth else c for c in curves]
            x_key = "eval_step" if key in ("accuracy", "eval_loss") else "step"
            _band(ax, runs[0]["curves"][x_key], curves, colors[arm], arm)
            lows.append(min(min(c) for c in curves))
            highs.append(statistics.fmean(c[len(c) // 8] for c in curves))  # past the first eighth: the end is readable
            drawn = True
        if smooth and lows:
            ax.set_ylim(min(lows) - 0.02, max(highs))
        ax.set_yscale("log" if log else "linear")
        ax.set_title(setting or "all runs", fontsize=9)
        ax.set_xlabel("optimiser step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel(ylabel, fontsize=8)
    axes[-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    if not drawn:
        _pyplot().close(fig)
        return None
    return _save(fig, path)


def plot_finals(groups: dict, stats: dict, path: Path, *, accuracy: bool) -> Path:
    """Final held-out loss (or test accuracy) per arm with its 95% interval, one panel per setting."""
    fig, axes = _panels(groups, height=0.35 * max(len(g) for g in groups.values()) + 1.2)
    key = "accuracy" if accuracy else "val"
    for ax, (setting, group) in zip(axes, groups.items()):
        names = list(group)
        for y, arm in enumerate(names):
            mean, half = stats[setting][arm][key]
            scale = 100 if accuracy else 1
            ax.errorbar([mean * scale], [y], xerr=[[(half or 0) * scale]], fmt="o", ms=4, capsize=3)
            for r in group[arm]:
                ax.plot([r["accuracy" if accuracy else "final_val_loss"] * scale], [y], ".", color="gray", ms=3)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(setting or "all runs", fontsize=9)
        ax.set_xlabel("test accuracy (%)" if accuracy else "final validation loss (nats/token)", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_prediction(groups: dict, stats: dict, path: Path, key: str = "spread") -> Path:
    """Predicted spread m₂/m₁² (x, log; ``key``: at the runs' initialisation, or ``random_spread`` with random H)
    against the final validation loss (y), per depth."""
    fig, axes = _panels(groups)
    colors = _colors(list(dict.fromkeys(arm for g in groups.values() for arm in g)))
    for ax, (setting, group) in zip(axes, groups.items()):
        for arm in group:
            s = stats[setting][arm]
            mean, half = s["val"]
            ax.errorbar([s[key]], [mean], yerr=[[half or 0]], fmt="o", ms=5, capsize=3, color=colors[arm], label=arm)
        ax.set_xscale("log")
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel(f"predicted m₂/m₁² of ∂X_L/∂X_0, {'random H' if key.startswith('random') else 'at init'}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("final validation loss (95% CI)", fontsize=8)
    axes[-1].legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------


def write_report(output_dir: str | Path, docs: str | Path | None = None) -> dict:
    """``report.md`` and the figures in ``output_dir`` from its ``results.json``; with ``docs``, the figures are
    copied to ``docs/figures/<study>/`` and the runs merged into the spec's summary JSON there. Returns the
    statistics: setting → arm → numbers."""
    output_dir = Path(output_dir)
    results = json.loads((output_dir / "results.json").read_text(encoding="utf-8"))
    spec, runs = results["spec"], results["runs"]
    if not runs:
        raise ValueError(f"{output_dir / 'results.json'} has no finished runs yet")
    targets = fill_targets(spec, runs)
    groups = by_group(runs)
    stats = {setting: arm_statistics(arms, spec.get("reference")) for setting, arms in groups.items()}
    accuracy = "accuracy" in runs[0]

    figures = [
        plot_curves(groups, "loss", output_dir / "loss.png", "training loss (5-log mean; band: seeds)", smooth=True),
        plot_curves(groups, "h_distance", output_dir / "h_distance.png", "mean ‖H − H_init‖_F over sites"),
        plot_curves(groups, "amax", output_dir / "amax.png", "composite Amax gain (max fwd/bwd)", log=True),
        plot_finals(groups, stats, output_dir / "final.png", accuracy=accuracy),
    ]
    if accuracy:
        figures.append(plot_curves(groups, "accuracy", output_dir / "accuracy.png", "test accuracy"))
    if spec.get("spectrum"):
        figures.append(plot_prediction(groups, stats, output_dir / "prediction_init.png"))
        figures.append(plot_prediction(groups, stats, output_dir / "prediction_random.png", key="random_spread"))
    figures = [f for f in figures if f is not None]

    sections = [f"# Study `{spec['name']}`\n", spec.get("description", "").strip() + "\n"]
    for setting, arm_stats in stats.items():
        title = setting or "all runs"
        line = f"target {'accuracy' if accuracy else 'training loss'}: {targets[setting]:.4f}"
        if accuracy:
            flat = {arm: plateaued(groups[setting][arm]) for arm in arm_stats}
            line += "; test accuracy plateaued (last 3 evaluations within 0.3 points): " + ", ".join(
                f"{arm} {'yes' if ok else 'no'}" for arm, ok in flat.items())  # fmt: skip
        sections.append(f"## {title}\n\n{line}\n\n{setting_table(spec, arm_stats, targets[setting])}\n")
        contrasts = contrast_table(groups[setting])
        if contrasts:
            sections.append(f"Paired contrasts of the claims ({title}):\n\n{contrasts}\n")
    overhead = [r["monitor_overhead"] for r in runs if r.get("monitor_overhead") is not None]
    if overhead:
        sections.append(f"H-dynamics logging took a median {100 * statistics.median(overhead):.1f}% "
                        f"(max {100 * max(overhead):.1f}%) of the training time between two log steps.\n")  # fmt: skip
    sections.append("Figures: " + ", ".join(f"`{f.name}`" for f in figures) + "\n")
    atomic_write_text(output_dir / "report.md", "\n".join(sections))
    atomic_write_text(output_dir / "results.json", json.dumps({**results, "targets": targets}, indent=1) + "\n")
    if docs is not None:
        publish(spec, runs, figures, Path(docs))
    print((output_dir / "report.md").read_text(encoding="utf-8"))
    return stats


def publish(spec: dict, runs: list[dict], figures: list[Path], docs: Path) -> None:
    """Copy the figures to ``docs/figures/<study>/`` and merge the runs (without curves) into the summary JSON."""
    target = docs / "figures" / spec["name"]
    target.mkdir(parents=True, exist_ok=True)
    for figure in figures:
        (target / figure.name).write_bytes(figure.read_bytes())
    if spec.get("summary"):
        path = docs / Path(spec["summary"]).name
        kept = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
        kept = [r for r in kept if r.get("study") != spec["name"]]
        rows = [{k: v for k, v in r.items() if k not in SUMMARY_EXCLUDE} for r in runs]
        atomic_write_text(path, json.dumps(kept + rows, indent=1) + "\n")
