"""``hf-jpmhc spectrum`` (predicted vs Monte-Carlo Jacobian spectra) and ``hf-jpmhc gain`` (Amax gains)."""

from __future__ import annotations

import argparse
from contextlib import contextmanager

SPECTRUM_EXAMPLE = "example: hf-jpmhc spectrum --mixer stiefel,sinkhorn,grassmann --streams 4 --depth 32 --output spectrum.png"
GAIN_EXAMPLE = "example: hf-jpmhc gain --model ./smollm2-jpmhc --output gain.png"


def register(subparsers: argparse._SubParsersAction) -> None:
    spectrum = subparsers.add_parser(
        "spectrum", help="free-probability vs Monte-Carlo Jacobian spectra of randomly initialised models", epilog=SPECTRUM_EXAMPLE
    )
    spectrum.add_argument("--mixer", default="stiefel,sinkhorn,grassmann", help="comma-separated mixer names")
    spectrum.add_argument("--streams", type=int, default=4, help="n, the number of residual streams")
    spectrum.add_argument("--depth", type=int, default=32, help="decoder layers L (2L hyper-connection sites)")
    spectrum.add_argument("--hidden", type=int, default=64, help="hidden size C of the Monte-Carlo models")
    spectrum.add_argument("--gain", type=float, default=None, help="branch gain g (default 0.2)")
    spectrum.add_argument("--logit-std", default="default",
                          help="scale s of the random mixer logits; 'init' keeps the mixers at their init; "
                               "'default' = 1 (0.02 for unconstrained)")  # fmt: skip
    spectrum.add_argument("--samples", type=int, default=4, help="Monte-Carlo models per mixer")
    spectrum.add_argument("--density-draws", type=int, default=2, help="mixer draws averaged for the predicted density")
    spectrum.add_argument("--branch", choices=("linear", "lm"), default="linear",
                          help="Monte-Carlo models: 'linear' = hyper-connection stacks with Gaussian linear branches "
                               "(the predictor's own ensemble, branch gain --gain); 'lm' = randomly initialised JPmHC LMs "
                               "(Llama attention + MLP, pre-RMSNorm), predicted from each model's measured branch gains")  # fmt: skip
    spectrum.add_argument("--tokens", type=int, default=2, help="sequence length T for --branch lm and --model "
                          "(the spectrum is that of each position's block ∂X_L[t]/∂X_0[t], pooled over t)")  # fmt: skip
    spectrum.add_argument("--model", default=None, help="a JPmHC checkpoint: its own empirical spectrum and its prediction")
    spectrum.add_argument("--prompt", default="The capital of Germany is", help="text for --model (first --tokens tokens)")
    spectrum.add_argument("--output", default="spectrum.png", help="PNG to write")
    spectrum.add_argument("--json", default=None, help="--branch lm: also write the per-model moments to this JSON file")
    spectrum.add_argument("--rotated-control", type=int, default=0, metavar="DRAWS",
                          help="--branch lm: also rebuild each model's Jacobian with its branch Jacobians J_F made free by "
                               "a Haar rotation of their input side (DRAWS per position; same g_k, β_k, so the same "
                               "prediction): rotated vs MC measures the real branches' non-freeness")  # fmt: skip
    spectrum.add_argument("--seed", type=int, default=0)
    spectrum.set_defaults(func=_spectrum, prog=spectrum.prog)

    gain = subparsers.add_parser("gain", help="per-site and composite Amax gains of a JPmHC model", epilog=GAIN_EXAMPLE)
    gain.add_argument("--model", required=True, help="a JPmHC checkpoint directory (or Hub name)")
    gain.add_argument("--prompt", default="The capital of Germany is", help="text the gains are measured on")
    gain.add_argument("--output", default="gain.png", help="PNG to write")
    gain.set_defaults(func=_gain, prog=gain.prog)


@contextmanager
def _single_thread():
    """The matrices here are n×n or C-wide: thread start-up costs more than it saves (100× on a busy CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _load(path: str):
    import hf_jpmhc  # noqa: F401  (registers the JPmHC Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..loading import load_pretrained

    model = load_pretrained(AutoModelForCausalLM, path, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _spectrum(args: argparse.Namespace) -> None:
    with _single_thread():
        if args.tokens < 1:
            raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
        if args.model:
            _model_spectrum(args)
        elif args.branch == "lm":
            _lm_ensemble_spectrum(args)
        else:
            _ensemble_spectrum(args)


def _logit_std(value: str, mixer: str) -> float | None:
    from .ensemble import DEFAULT_LOGIT_STD

    if value == "init":
        return None
    if value == "default":
        return DEFAULT_LOGIT_STD.get(mixer, 1.0)
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--logit-std must be a number, 'init' or 'default', got {value!r}") from None


def _ensemble_spectrum(args: argparse.Namespace) -> None:
    import math

    import torch
    from tqdm import tqdm

    from .ensemble import DEFAULT_BRANCH_GAIN, RandomHyperConnectionEnsemble
    from .free_probability import jacobian_moments, predict_spectrum
    from .jacobian import exact_jacobian, squared_singular_values
    from .plots import SpectrumPanel, plot_spectra

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    gain = DEFAULT_BRANCH_GAIN if args.gain is None else args.gain
    rows, panels = [], []
    for mixer in [m.strip() for m in args.mixer.split(",") if m.strip()]:
        ensemble = RandomHyperConnectionEnsemble(mixer, args.streams, args.depth, args.hidden, branch_gain=gain)
        ensemble.logit_std = _logit_std(args.logit_std, ensemble.mixer)
        generator = torch.Generator().manual_seed(args.seed)
        values, cond_m1, cond_m2 = [], [], []
        for _ in tqdm(range(args.samples), desc=f"Monte-Carlo Jacobians ({ensemble.mixer})", leave=False):
            model = ensemble.sample_model(generator)
            start = torch.randn(args.streams, args.hidden, dtype=torch.float64, generator=generator)
            values.append(squared_singular_values(exact_jacobian(model, start)))
            m1, m2 = jacobian_moments(model.coefficients(), gain)
            cond_m1.append(m1.item()), cond_m2.append(m2.item())
        empirical = torch.stack(values)  # (samples, N)
        mc_m1, mc_m2 = empirical.mean().item(), empirical.square().mean().item()
        moments = predict_spectrum(ensemble, num_draws=256)
        top = math.log10(max(moments.second_moment / moments.mean, empirical.max().item())) + 0.5
        grid = torch.logspace(math.log10(moments.mean) - 5, top, 60, dtype=torch.float64)
        density = predict_spectrum(ensemble, num_draws=args.density_draws, density_draws=args.density_draws, grid=grid)
        cond1, cond2 = sum(cond_m1) / len(cond_m1), sum(cond_m2) / len(cond_m2)
        rows.append((ensemble.mixer, args.depth, moments.mean, cond1, mc_m1, moments.second_moment, cond2, mc_m2))
        title = f"{ensemble.mixer}: n={args.streams}, L={args.depth}, C={args.hidden}, g={gain}, s={ensemble.logit_std}"
        panels.append(SpectrumPanel(title, grid, density.density, empirical.flatten()))
    _print_table(rows)
    plot_spectra(panels, args.output, "Squared singular values of the stream Jacobian at initialisation")
    print(f"wrote {args.output}")


def _print_table(rows) -> None:
    header = (f"{'mixer':<14}{'depth':>6}  {'m1 pred':>10}{'m1 pred|H':>11}{'m1 MC':>10}{'err':>8}{'err|H':>8}"
              f"  {'m2 pred':>10}{'m2 pred|H':>11}{'m2 MC':>10}{'err':>8}{'err|H':>8}")  # fmt: skip
    print(header)
    for mixer, depth, p1, c1, e1, p2, c2, e2 in rows:
        print(f"{mixer:<14}{depth:>6}  {p1:>10.4g}{c1:>11.4g}{e1:>10.4g}{p1 / e1 - 1:>+8.1%}{c1 / e1 - 1:>+8.1%}"
              f"  {p2:>10.4g}{c2:>11.4g}{e2:>10.4g}{p2 / e2 - 1:>+8.1%}{c2 / e2 - 1:>+8.1%}")  # fmt: skip
    print("pred: ensemble mean over 256 mixer draws; pred|H: conditioned on the Monte-Carlo models' own mixers; "
          "m1 = tr(JJᵀ)/N, m2 = tr((JJᵀ)²)/N")  # fmt: skip


def _lm_ensemble_spectrum(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from .ensemble import RandomJPmHCEnsemble, SiteCoefficients, rotated_branch_control
    from .free_probability import jacobian_moments
    from .jacobian import measure_sites, token_spectra
    from .plots import SpectrumPanel, plot_spectra

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.rotated_control < 0:
        raise ValueError(f"--rotated-control must be >= 0, got {args.rotated_control}")
    rows, panels, rotated_rows = [], [], []
    for mixer in [m.strip() for m in args.mixer.split(",") if m.strip()]:
        ensemble = RandomJPmHCEnsemble(mixer, args.streams, args.depth, args.hidden, num_tokens=args.tokens)
        ensemble.logit_std = _logit_std(args.logit_std, ensemble.mixer)
        generator = torch.Generator().manual_seed(args.seed)
        rotation_generator = torch.Generator().manual_seed(args.seed)  # separate: the models do not depend on the flag
        values, predicted, rotated, first = [], [], [], None
        for _ in tqdm(range(args.samples), desc=f"Monte-Carlo LMs ({ensemble.mixer})", leave=False):
            model, input_ids = ensemble.sample_model(generator)
            measurement = measure_sites(model, input_ids, keep_blocks=args.rotated_control > 0)
            values.append(token_spectra(model, input_ids))  # (T, nC)
            predicted.append(torch.stack(jacobian_moments(measurement.coefficients, measurement.gain, measurement.kappa4)))
            if args.rotated_control:
                c = measurement.coefficients
                rotated.append(torch.stack([
                    rotated_branch_control(SiteCoefficients(c.pre[t], c.post[t], c.mixer[t]), measurement.blocks[t],
                                           args.rotated_control, rotation_generator).mean(0)
                    for t in range(input_ids.numel())
                ]).mean(0))  # (2,), pooled over t like the MC  # fmt: skip
            measurement.blocks = None
            first = first or measurement
        empirical, predicted = torch.stack(values), torch.stack(predicted)  # (S, T, nC), (S, 2, T)
        per_model = torch.stack([empirical.mean((1, 2)), empirical.square().mean((1, 2))])  # (2, S), pooled over t
        rows.append((ensemble.mixer, args.depth, predicted.mean(2).T, per_model))  # (2, S) each
        if args.rotated_control:
            rotated_rows.append((ensemble.mixer, args.depth, predicted.mean(2).T, torch.stack(rotated).T, per_model))
        grid, density = _predicted_density(first, empirical)
        title = (f"{ensemble.mixer}: n={args.streams}, L={args.depth}, C={args.hidden}, T={args.tokens}, "
                 f"s={ensemble.logit_std}\n{args.samples} random LMs; prediction for the first")  # fmt: skip
        panels.append(SpectrumPanel(title, grid, density, empirical.flatten()))
    _print_ensemble_table(rows)
    if rotated_rows:
        _print_rotated_table(rotated_rows, args.rotated_control)
    if args.json:
        _write_json(args, rows, rotated_rows)
    plot_spectra(panels, args.output, "Squared singular values of ∂X_L[t]/∂X_0[t], randomly initialised JPmHC LMs")
    print(f"wrote {args.output}")


def _predicted_density(measurement, empirical):
    """Predicted density on a log grid spanning the empirical values, averaged over token positions (circular law)."""
    import math

    import torch

    from .free_probability import jacobian_density

    values = empirical[empirical > 0]
    top = math.log10(values.max().item()) + 0.5
    grid = torch.logspace(max(math.log10(values.mean().item()) - 5, math.log10(values.min().item()) - 0.5), top, 60,
                          dtype=torch.float64)  # fmt: skip
    return grid, jacobian_density(measurement.coefficients, measurement.gain, grid).mean(0)


def _print_measured_table(rows, note: str) -> None:
    print(f"{'mixer':<14}{'depth':>6}  {'m1 pred':>10}{'m1 MC':>10}{'err':>8}  {'m2 pred':>10}{'m2 MC':>10}{'err':>8}")
    for mixer, depth, p1, e1, p2, e2 in rows:
        print(f"{mixer:<14}{depth:>6}  {p1:>10.4g}{e1:>10.4g}{p1 / e1 - 1:>+8.1%}  {p2:>10.4g}{e2:>10.4g}{p2 / e2 - 1:>+8.1%}")
    print(note + "; m1 = tr(JJᵀ)/N, m2 = tr((JJᵀ)²)/N, N = nC")


def _print_ensemble_table(rows) -> None:
    """m1, m2 predicted vs Monte Carlo over S models, with standard errors over models (± columns)."""
    from .ensemble import bootstrap_relative_error, paired_relative_error, standard_error

    def cells(predicted, empirical):
        err, err_se = paired_relative_error(predicted, empirical)
        low, high = bootstrap_relative_error(predicted, empirical)
        return (f"{predicted.mean().item():>10.4g}{empirical.mean().item():>10.4g} ±{standard_error(empirical):<8.2g}"
                f"{err:>+7.1%} ±{err_se:<6.1%}{f'[{low:+.0%}, {high:+.0%}]':>14}")  # fmt: skip

    print(f"{'mixer':<14}{'depth':>6}  {'m1 pred':>10}{'m1 MC':>10} {'± se':<8}{'err':>7} {'± se':<6}{'90% boot':>14}"
          f"  {'m2 pred':>10}{'m2 MC':>10} {'± se':<8}{'err':>7} {'± se':<6}{'90% boot':>14}")  # fmt: skip
    for mixer, depth, predicted, empirical in rows:
        print(f"{mixer:<14}{depth:>6}  {cells(predicted[0], empirical[0])}  {cells(predicted[1], empirical[1])}")
    print("pred: free-probability moments from each model's measured branch gains g_k and κ₄ (ensemble.py: "
          "RandomJPmHCEnsemble), averaged over models and positions; m1 = tr(JJᵀ)/N, m2 = tr((JJᵀ)²)/N, N = nC;\n"
          "± se: standard error over models of the MC mean, and of err = Σpred/ΣMC − 1 paired by model; "
          "90% boot: percentile bootstrap interval of err over models")  # fmt: skip


def _print_rotated_table(rows, draws: int) -> None:
    """The rotated-branch control: prediction vs free (rotated) branches, and rotated vs the real branches (MC)."""
    from .ensemble import bootstrap_relative_error, paired_relative_error

    def cells(estimate, reference):
        err, err_se = paired_relative_error(estimate, reference)
        low, high = bootstrap_relative_error(estimate, reference)
        return f"{err:>+7.1%} ±{err_se:<6.1%}{f'[{low:+.0%}, {high:+.0%}]':>14}"

    print(f"{'mixer':<14}{'depth':>6}  {'m1 pred/rot':>11} {'± se':<6}{'90% boot':>14}  {'m1 rot/MC':>9} {'± se':<6}"
          f"{'90% boot':>14}  {'m2 pred/rot':>11} {'± se':<6}{'90% boot':>14}  {'m2 rot/MC':>9} {'± se':<6}{'90% boot':>14}")  # fmt: skip
    for mixer, depth, predicted, rotated, empirical in rows:
        print(f"{mixer:<14}{depth:>6}  {cells(predicted[0], rotated[0]):>32}  {cells(rotated[0], empirical[0]):>30}"
              f"  {cells(predicted[1], rotated[1]):>32}  {cells(rotated[1], empirical[1]):>30}")  # fmt: skip
    print(f"rot: each model's own branch Jacobians J_F with a Haar-rotated input side ({draws} draws per position: free, "
          "same g_k, β_k); pred/rot = Σpred/Σrot − 1 (the predictor on free branches), rot/MC = Σrot/ΣMC − 1 "
          "(the real branches' non-freeness), paired by model")  # fmt: skip


def _write_json(args: argparse.Namespace, rows, rotated_rows=()) -> None:
    import json

    from ..outputs import atomic_write_text
    from .ensemble import bootstrap_relative_error, paired_relative_error

    rotated_by_mixer = {row[0]: row[3] for row in rotated_rows}
    records = []
    for mixer, depth, predicted, empirical in rows:
        record = {"mixer": mixer, "depth": depth, "streams": args.streams, "hidden": args.hidden, "tokens": args.tokens,
                  "seed": args.seed}  # fmt: skip
        for k, name in enumerate(("m1", "m2")):
            err, err_se = paired_relative_error(predicted[k], empirical[k])
            record.update({f"{name}_pred": predicted[k].tolist(), f"{name}_mc": empirical[k].tolist(),
                           f"{name}_err": err, f"{name}_err_se": err_se,
                           f"{name}_err_boot90": bootstrap_relative_error(predicted[k], empirical[k])})  # fmt: skip
            if mixer in rotated_by_mixer:
                record[f"{name}_rot"] = rotated_by_mixer[mixer][k].tolist()
        if mixer in rotated_by_mixer:
            record["rotated_control_draws"] = args.rotated_control
        records.append(record)
    atomic_write_text(args.json, json.dumps(records, indent=1))
    print(f"wrote {args.json}")


def _model_spectrum(args: argparse.Namespace) -> None:
    import torch

    from .free_probability import jacobian_moments
    from .jacobian import (exact_jacobian, jacobian_moment_estimates, measure_sites, model_initial_streams,
                           model_stream_map, squared_singular_values, token_stream_map)  # fmt: skip
    from .plots import SpectrumPanel, plot_spectra

    model, tokenizer = _load(args.model)
    model = model.double()  # streams in float64; the coefficients stay float32 (SPEC §1)
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids[0, : args.tokens]
    measurement = measure_sites(model, input_ids)
    p1, p2 = jacobian_moments(measurement.coefficients, measurement.gain, measurement.kappa4)  # (T,)
    stream_map, start = model_stream_map(model, input_ids), model_initial_streams(model, input_ids)
    size = start[0].numel()
    generator = torch.Generator().manual_seed(args.seed)
    empirical, moments = [], []
    for t in range(start.shape[0]):
        block = token_stream_map(stream_map, start, t)
        if size <= 2048:
            values = squared_singular_values(exact_jacobian(block, start[t], chunk_size=256))
            empirical.append(values)
            moments.append((values.mean().item(), values.square().mean().item()))
        else:
            moments.append(jacobian_moment_estimates(block, start[t], num_probes=16, generator=generator))
    e1, e2 = (sum(m[i] for m in moments) / len(moments) for i in (0, 1))
    how = "exact" if empirical else f"Hutchinson, 16 probes (N = {size})"
    mixer = model.config.mixer
    _print_measured_table([(mixer, model.config.num_hidden_layers, p1.mean().item(), e1, p2.mean().item(), e2)],
                          f"pred: from {args.model}'s measured branch gains on {input_ids.numel()} token(s); MC: {how}")  # fmt: skip
    if empirical:
        empirical = torch.stack(empirical)
        grid, density = _predicted_density(measurement, empirical)
        title = f"{args.model}: {mixer}, n={model.config.num_streams}, L={model.config.num_hidden_layers}, T={start.shape[0]}"
        plot_spectra([SpectrumPanel(title, grid, density, empirical.flatten())], args.output)
        print(f"wrote {args.output}")
    else:
        print("no plot: the Jacobian is too large to diagonalise exactly (N > 2048)")


def _gain(args: argparse.Namespace) -> None:
    from .gain import model_gain
    from .plots import plot_gains

    with _single_thread():
        model, tokenizer = _load(args.model)
        report = model_gain(model, **tokenizer(args.prompt, return_tensors="pt"))
    print(f"{'site':<28}{'fwd':>9}{'bwd':>9}{'composite fwd':>15}{'composite bwd':>15}")
    for k, name in enumerate(report.site_names):
        print(f"{name:<28}{report.site_forward[k]:>9.4f}{report.site_backward[k]:>9.4f}"
              f"{report.composite_forward[k]:>15.4f}{report.composite_backward[k]:>15.4f}")  # fmt: skip
    plot_gains(report, args.output, f"Amax gain of {args.model} on {args.prompt!r}")
    print(f"wrote {args.output}")
