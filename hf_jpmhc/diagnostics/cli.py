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
    spectrum.add_argument("--model", default=None, help="a JPmHC checkpoint: show its own empirical spectrum instead")
    spectrum.add_argument("--prompt", default="The capital of Germany is", help="text for --model (first token used)")
    spectrum.add_argument("--output", default="spectrum.png", help="PNG to write")
    spectrum.add_argument("--seed", type=int, default=0)
    spectrum.set_defaults(func=_spectrum)

    gain = subparsers.add_parser("gain", help="per-site and composite Amax gains of a JPmHC model", epilog=GAIN_EXAMPLE)
    gain.add_argument("--model", required=True, help="a JPmHC checkpoint directory (or Hub name)")
    gain.add_argument("--prompt", default="The capital of Germany is", help="text the gains are measured on")
    gain.add_argument("--output", default="gain.png", help="PNG to write")
    gain.set_defaults(func=_gain)


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

    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _spectrum(args: argparse.Namespace) -> None:
    with _single_thread():
        if args.model:
            _model_spectrum(args)
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
        ensemble = RandomHyperConnectionEnsemble(mixer, args.streams, args.depth, args.hidden, gain)
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


def _model_spectrum(args: argparse.Namespace) -> None:
    import torch

    from .jacobian import exact_jacobian, jacobian_moment_estimates, model_stream_map, squared_singular_values
    from .plots import SpectrumPanel, plot_spectra

    model, tokenizer = _load(args.model)
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids[0, :1]  # one token position
    stream_map = model_stream_map(model, input_ids)
    n, hidden = model.config.num_streams, model.config.hidden_size
    start = model.get_input_embeddings()(input_ids).detach().unsqueeze(-2).expand(1, n, hidden).clone()  # (T, n, C)
    size = start.numel()
    if size <= 2048:
        values = squared_singular_values(exact_jacobian(stream_map, start, chunk_size=256))
        m1, m2 = values.mean().item(), values.square().mean().item()
        plot_spectra([SpectrumPanel(f"{args.model} (one token)", None, None, values)], args.output)
        print(f"exact Jacobian ({size}×{size}): m1 = {m1:.4g}, m2 = {m2:.4g}, max σ² = {values.max().item():.4g}")
        print(f"wrote {args.output}")
    else:
        m1, m2 = jacobian_moment_estimates(stream_map, start, num_probes=16, generator=torch.Generator().manual_seed(args.seed))
        print(f"Hutchinson estimates (16 probes, N = {size}): m1 = {m1:.4g}, m2 = {m2:.4g} (no plot: too large for exact)")


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
