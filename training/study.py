"""Residual-mixer studies (issue 22): arms × settings × seeds of ``pretrain.py`` or ``finetune_vision.py`` runs on the
same data, tokens and schedule — resumable, summarised in one results file, with tables and plots.

    python training/study.py run training/configs/studies/mixers.yaml --output_dir runs/study/mixers
    python training/study.py report runs/study/mixers --docs docs      # tables, plots and the docs JSON, again
    python training/study.py list training/configs/studies/depth.yaml  # the runs and their flags, nothing run

A study spec (YAML, ``training/configs/studies/``):

    name:        the study (the ``study`` key of its runs in the summary JSON)
    script:      pretrain | finetune_vision
    base:        flags shared by every run (the script's config fields; null leaves the script's default). For
                 pretrain, ``model`` may be a mapping of JPmHCConfig fields, written to the run's ``model.json``
    arms:        name → flags on top of base, e.g. {mixer: sinkhorn, hc_lr_scale: 10}
    grid:        field → values, crossed with the arms; ``model.<field>`` sets a field of the model mapping
    seeds:       the seeds; every arm and setting runs with each
    reference:   the arm every other is compared with, seed by seed (paired differences)
    target:      {metric: train_loss | test_accuracy, value: null}: "steps to target"; null = the worst run's final
                 value in each setting, which every run reaches
    epoch_steps: optimiser steps per epoch (vision): evaluations then fall on epochs and the tables count epochs
    spectrum:    true: each run's stream-Jacobian moments predicted at initialisation (``hf-jpmhc spectrum``'s
                 free-probability predictor on the run's own initial model, ``predict_spectrum_at_init``)
    summary:     the docs JSON the study's runs are merged into (each run keyed by ``study``)

Runs go seed by seed (every arm and setting of seed 0 first, so a partial study is balanced), each in its own
process (``--in_process``: this one) with ``--resume`` and ``--threads`` intra-op threads. A run is done when
``runs/<run>/summary.json`` exists: a killed study, started again, skips the finished runs and resumes the
interrupted one from its last checkpoint; a run's checkpoints are deleted once it is summarised. ``results.json``
is rewritten after every run; at the end ``study_report`` writes ``report.md`` and the figures (``report``
redoes that from ``results.json`` alone).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.common import atomic_write_text, read_jsonl  # noqa: E402

TRAINING_DIR = Path(__file__).resolve().parent
SCRIPTS = {"pretrain": "val_loss", "finetune_vision": "test_loss"}  # script → its held-out loss in the logs
TARGET_METRICS = ("train_loss", "test_accuracy")
SPEC_KEYS = {"name", "script", "description", "base", "arms", "grid", "seeds", "reference", "target", "epoch_steps",
             "spectrum", "summary"}  # fmt: skip
SPECTRUM_TOKENS = 4  # positions of the first validation block the prediction is made on


# ----------------------------------------------------------------------------------------------------
# the spec and its runs
# ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run of the study: its name, arm, grid setting, seed and the script's flags."""

    name: str
    arm: str
    setting: dict
    seed: int
    flags: dict = field(default_factory=dict)
    model: dict | None = None  # pretrain's model mapping, written to a JSON file

    @property
    def setting_label(self) -> str:
        return setting_label(self.setting)


def setting_label(setting: dict) -> str:
    """"num_hidden_layers=8" for {"model.num_hidden_layers": 8}; "" for the single setting of a study without grid."""
    return ",".join(f"{key.removeprefix('model.')}={value}" for key, value in setting.items())


def load_spec(path: str | Path) -> dict:
    """The study spec at ``path``, checked: unknown keys, scripts, arms and targets raise ValueError naming them."""
    spec = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown study key(s) {unknown}; valid: {sorted(SPEC_KEYS)}")
    for key in ("name", "script", "arms", "seeds"):
        if not spec.get(key):
            raise ValueError(f"{path}: the study needs {key!r}")
    if spec["script"] not in SCRIPTS:
        raise ValueError(f"{path}: script must be one of {sorted(SCRIPTS)}, got {spec['script']!r}")
    if spec.get("reference") and spec["reference"] not in spec["arms"]:
        raise ValueError(f"{path}: reference {spec['reference']!r} is not one of the arms {sorted(spec['arms'])}")
    metric = (spec.get("target") or {}).get("metric", "train_loss")
    if metric not in TARGET_METRICS:
        raise ValueError(f"{path}: target metric must be one of {TARGET_METRICS}, got {metric!r}")
    if spec.get("spectrum") and spec["script"] != "pretrain":
        raise ValueError(f"{path}: spectrum predictions are made for language models (script: pretrain)")
    return spec


def study_runs(spec: dict) -> list[Run]:
    """Every run of the study, seed by seed, then setting by setting, then arm by arm."""
    grid = spec.get("grid") or {}
    settings = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    runs = []
    for seed, setting, (arm, arm_flags) in itertools.product(spec["seeds"], settings, spec["arms"].items()):
        flags = {**(spec.get("base") or {}), **(arm_flags or {})}
        model = flags.pop("model") if isinstance(flags.get("model"), dict) else None
        for key, value in setting.items():
            if key.startswith("model."):
                if model is None:
                    raise ValueError(f"grid key {key!r} needs base.model to be a mapping of model fields")
                model = {**model, key.removeprefix("model."): value}
            else:
                flags[key] = value
        if spec.get("epoch_steps"):
            flags.setdefault("eval_every", spec["epoch_steps"])
        flags["seed"] = seed
        label = "-".join(f"{key.removeprefix('model.')}{value}" for key, value in setting.items())
        name = "-".join(part for part in (arm, label, f"s{seed}") if part)
        runs.append(Run(name, arm, setting, seed, flags, model))
    return runs


def command_line(run: Run, run_dir: Path) -> list[str]:
    """The script's flags for ``run`` in ``run_dir`` (the model mapping written next to it)."""
    flags = dict(run.flags)
    if run.model is not None:
        path = run_dir / "model.json"
        if not path.is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(run.model, indent=1) + "\n")
        flags["model"] = str(path)
    return [f"--{key}={value}" for key, value in flags.items() if value is not None] + [f"--output_dir={run_dir}", "--resume"]


# ----------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------


def execute(spec: dict, run: Run, run_dir: Path, *, threads: int, in_process: bool) -> None:
    """Train ``run`` to its end (resuming a checkpoint in ``run_dir`` if there is one); raise on failure."""
    argv = command_line(run, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if in_process:
        import importlib

        import torch

        torch.set_num_threads(threads)
        importlib.import_module(f"training.{spec['script']}").main(argv)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with (run_dir / "train.log").open("a", encoding="utf-8") as log:
        result = subprocess.run([sys.executable, str(TRAINING_DIR / f"{spec['script']}.py"), *argv], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=TRAINING_DIR.parent)  # fmt: skip
    if result.returncode != 0:
        tail = (run_dir / "train.log").read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"run {run.name} failed (exit {result.returncode}); end of {run_dir / 'train.log'}:\n{tail}")


def run_study(spec: dict, output_dir: Path, *, threads: int = 1, in_process: bool = False) -> list[dict]:
    """Run every unfinished run of ``spec`` into ``output_dir``, summarising each; returns the summaries."""
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "spec.yaml", yaml.safe_dump(spec, sort_keys=False))
    runs = study_runs(spec)
    failed = []
    for index, run in enumerate(runs, 1):
        run_dir = output_dir / "runs" / run.name
        if (run_dir / "summary.json").is_file():
            continue
        print(f"[study {spec['name']}] run {index}/{len(runs)}: {run.name}", flush=True)
        try:
            if spec.get("spectrum") and not (run_dir / "spectrum.json").is_file():
                run_dir.mkdir(parents=True, exist_ok=True)
                prediction = predict_spectrum_at_init(command_line(run, run_dir), threads)
                atomic_write_text(run_dir / "spectrum.json", json.dumps(prediction, indent=1) + "\n")
            start = time.perf_counter()
            execute(spec, run, run_dir, threads=threads, in_process=in_process)
        except Exception as error:  # noqa: BLE001 — one failed run must not stop the study; it is retried next time
            failed.append(run.name)
            print(f"[study {spec['name']}] {error}", file=sys.stderr, flush=True)
            continue
        summary = summarize_run(spec, run, run_dir)
        summary["driver_seconds"] = time.perf_counter() - start
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        write_results(spec, output_dir)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}; run the same command again to retry them")
    return write_results(spec, output_dir)


def write_results(spec: dict, output_dir: Path) -> list[dict]:
    """``results.json``: the spec and the summary of every finished run, in run order."""
    summaries = [json.loads(path.read_text(encoding="utf-8"))
                 for run in study_runs(spec) if (path := output_dir / "runs" / run.name / "summary.json").is_file()]  # fmt: skip
    atomic_write_text(output_dir / "results.json", json.dumps({"spec": spec, "runs": summaries}, indent=1) + "\n")
    return summaries


# ----------------------------------------------------------------------------------------------------
# what a finished run leaves: its summary
# ----------------------------------------------------------------------------------------------------


def summarize_run(spec: dict, run: Run, run_dir: Path) -> dict:
    """The run's record for ``results.json``: identity, final numbers, costs, and its curves (for the plots)."""
    import torch
    from transformers import AutoConfig

    import hf_jpmhc  # noqa: F401  (registers the JPmHC Auto classes)
    from hf_jpmhc.diagnostics.flops import dense_flops, hyper_connection_flops
    from training.common import hyper_connection_parameters

    records = read_jsonl(run_dir / "logs" / "metrics.jsonl")
    logged = [r for r in records if "loss" in r]
    eval_key = SCRIPTS[spec["script"]]
    evals = [r for r in records if eval_key in r]
    final = run_dir / "final"
    config = AutoConfig.from_pretrained(final)
    model = _auto_class(config).from_pretrained(final, dtype=torch.float32)
    hc = hasattr(config, "num_streams")
    plain = "llama" if config.model_type == "llama" else "vit"
    context = run.flags.get("block_size", 128) // 2 if spec["script"] == "pretrain" else _vit_tokens(config)
    log_every = logged[1]["step"] - logged[0]["step"] if len(logged) > 1 else 1
    monitor = [r["monitor_seconds"] for r in logged if "monitor_seconds" in r]
    step_seconds = _median(r.get("step_seconds") for r in logged)
    summary = {
        "study": spec["name"],
        "run": run.name,
        "arm": run.arm,
        "setting": run.setting_label,
        "mixer": config.mixer if hc else plain,
        "num_streams": config.num_streams if hc else 1,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "seed": run.seed,
        "steps": logged[-1]["step"],
        "items": logged[-1]["items"],
        "hc_lr_scale": run.flags.get("hc_lr_scale", 1.0),
        "hc_weight_decay": run.flags.get("hc_weight_decay"),
        "final_val_loss": evals[-1][eval_key],
        "final_train_loss": statistics.fmean(r["loss"] for r in logged[-5:]),
        "max_amax": max((r["hc/amax"] for r in logged if "hc/amax" in r), default=None),
        "final_amax": logged[-1].get("hc/amax"),
        "final_h_distance": logged[-1].get("hc/h_dist_init"),
        "final_h_distance_min": logged[-1].get("hc/h_dist_init_min"),
        "final_h_dist_identity": logged[-1].get("hc/h_dist_identity"),
        "unmoved_sites": next((r["hc/unmoved_sites"] for r in logged if "hc/unmoved_sites" in r), None),
        "step_seconds": step_seconds,
        "step_cpu_seconds": _median(r.get("step_cpu_seconds") for r in logged),
        "monitor_overhead": _median(monitor) / (log_every * step_seconds) if monitor and step_seconds else None,
        "parameters": model.num_parameters(),
        "hc_parameters": sum(p.numel() for p in hyper_connection_parameters(model)),
        "hc_flops_per_token": hyper_connection_flops(config),
        "dense_flops_per_token": dense_flops(model, context),
        "curves": {
            "step": [r["step"] for r in logged],
            "loss": [r["loss"] for r in logged],
            "h_distance": [r.get("hc/h_dist_init") for r in logged],
            "amax": [r.get("hc/amax") for r in logged],
            "eval_step": [r["step"] for r in evals],
            "eval_loss": [r[eval_key] for r in evals],
        },
    }
    if "test_accuracy" in (evals[-1] if evals else {}):
        summary["accuracy"] = evals[-1]["test_accuracy"]
        summary["curves"]["accuracy"] = [r["test_accuracy"] for r in evals]
    if spec.get("epoch_steps"):
        summary["epochs"] = summary["steps"] / spec["epoch_steps"]
    if (run_dir / "spectrum.json").is_file():
        summary["spectrum"] = json.loads((run_dir / "spectrum.json").read_text(encoding="utf-8"))
    return summary


def _auto_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    return AutoModelForImageClassification if config.model_type in ("vit", "jpmhc_vit") else AutoModelForCausalLM


def _vit_tokens(config) -> int:
    return (config.image_size // config.patch_size) ** 2 + 1  # patches + CLS


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------------------------------
# the prediction at initialisation (study 2)
# ----------------------------------------------------------------------------------------------------


def predict_spectrum_at_init(argv: list[str], threads: int = 1) -> dict:
    """Free-probability moments of the squared singular values of ∂X_L/∂X_0 for the run's initial model (the one
    ``pretrain.py`` builds from these flags and seed), as ``hf-jpmhc spectrum --model`` predicts them: per-site
    branch gains measured on the first ``SPECTRUM_TOKENS`` tokens of the first validation block, then
    ``jacobian_moments``. A plain Llama is converted to its n = 1 identity-mixer equivalent (same function).

    Two predictions: ``m1, m2, spread`` for the model as it starts — every mixer at its identity logits, so identity,
    stiefel, grassmann and unconstrained start from the same H = I and get the same prediction — and ``random_*``
    for the same model with its mixer logits drawn as ``hf-jpmhc spectrum``'s ensemble draws them (b_res ~ N(0, s²),
    s = 1, 0.02 for unconstrained: a random point of each manifold, where the mixers differ). m1 = tr(JJᵀ)/N is the
    mean squared singular value; spread = m2/m1² ≥ 1 is 1 for an isometry and grows as the spectrum spreads.
    """
    import torch

    from hf_jpmhc import JPmHCForCausalLM, convert_llama
    from hf_jpmhc.data.text import build_lm_datasets
    from hf_jpmhc.diagnostics import jacobian_moments, measure_sites
    from hf_jpmhc.diagnostics.ensemble import DEFAULT_LOGIT_STD, randomize_mixer_logits
    from training import pretrain
    from training.common import seed_everything

    torch.set_num_threads(threads)
    config = pretrain.parse_config(argv)
    seed_everything(config.seed)  # as pretrain.main does before building the model
    tokenizer = pretrain.resolve_tokenizer(config)
    model, _ = pretrain.build_model(config, tokenizer)
    if not isinstance(model, JPmHCForCausalLM):
        model = convert_llama(model, num_streams=1, mixer="identity")
    data = build_lm_datasets(config.dataset, tokenizer, config.block_size, text_column=config.text_column,
                             dataset_config=config.dataset_config, val_fraction=config.val_fraction,
                             seed=config.seed).with_format("torch")  # fmt: skip
    input_ids = data["validation"][0]["input_ids"][:SPECTRUM_TOKENS]

    def moments(prefix: str) -> dict:
        measurement = measure_sites(model.eval(), input_ids)
        m1, m2 = (m.mean().item() for m in jacobian_moments(measurement.coefficients, measurement.gain, measurement.kappa4))
        return {f"{prefix}m1": m1, f"{prefix}m2": m2, f"{prefix}spread": m2 / m1**2}

    prediction = {**moments(""), "tokens": int(input_ids.numel())}
    logit_std = DEFAULT_LOGIT_STD.get(model.config.mixer, 1.0)
    sites = [hc for layer in model.model.layers for hc in (layer.attn_hc, layer.mlp_hc)]
    randomize_mixer_logits(sites, logit_std, torch.Generator().manual_seed(config.seed))
    return {**prediction, **moments("random_"), "random_logit_std": logit_std}


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) a study, then write its report")
    run.add_argument("spec", help="study YAML (training/configs/studies/)")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--threads", type=int, default=1, help="intra-op threads per run (default 1)")
    run.add_argument("--in_process", action="store_true", help="train in this process (small studies, tests)")
    run.add_argument("--docs", default=None, help="also write the summary JSON and the figures into this docs folder")
    report = commands.add_parser("report", help="tables, figures and the summary JSON from OUTPUT_DIR/results.json")
    report.add_argument("output_dir")
    report.add_argument("--docs", default=None, help="also write the summary JSON and the figures into this docs folder")
    listing = commands.add_parser("list", help="print the study's runs and their flags")
    listing.add_argument("spec")
    args = parser.parse_args(argv)

    from training import study_report

    try:
        if args.command == "list":
            for run_ in study_runs(load_spec(args.spec)):
                flags = {**run_.flags, **({"model": "<run_dir>/model.json"} if run_.model else {})}
                print(run_.name, " ".join(f"--{k}={v}" for k, v in flags.items() if v is not None),
                      "--output_dir=<run_dir> --resume")  # fmt: skip
            return None
        if args.command == "run":
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            spec, output_dir = load_spec(args.spec), Path(args.output_dir)
            run_study(spec, output_dir, threads=args.threads, in_process=args.in_process)
        else:
            output_dir = Path(args.output_dir)
            if not (output_dir / "results.json").is_file():
                raise ValueError(f"{output_dir} has no results.json: run the study first (study.py run SPEC --output_dir ...)")
        return study_report.write_report(output_dir, docs=args.docs)
    except (ValueError, FileNotFoundError) as error:  # bad input: one line, exit status 2
        print(f"study.py: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as error:  # failed runs, already reported one by one
        print(f"study.py: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
