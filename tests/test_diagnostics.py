"""Stability diagnostics: free-probability prediction vs Monte-Carlo Jacobians, Amax gains, plots, CLI."""

import json

import pytest
import torch

from hf_jpmhc import JPmHCConfig, JPmHCForCausalLM
from hf_jpmhc.diagnostics import (
    RandomHyperConnectionEnsemble,
    RandomJPmHCEnsemble,
    SiteCoefficients,
    bootstrap_relative_error,
    composite_mixers,
    exact_jacobian,
    gain_report,
    gaussian_branch_control,
    jacobian_density,
    jacobian_moment_estimates,
    jacobian_moments,
    measure_sites,
    model_gain,
    model_stream_map,
    paired_relative_error,
    predict_spectrum,
    rotated_branch_control,
    site_product,
    squared_singular_values,
    token_spectra,
)
from hf_jpmhc.diagnostics.plots import SpectrumPanel, plot_gains, plot_spectra
from tests.conftest import assert_ordinary_permissions, tiny_llama_kwargs

MIXERS = ["identity", "sinkhorn", "stiefel", "grassmann", "unconstrained"]


def _monte_carlo(ensemble, samples, seed=0):
    """Empirical (m₁, m₂) pooled over models, and the prediction conditioned on the same models' mixers."""
    generator = torch.Generator().manual_seed(seed)
    emp, cond = [], []
    for _ in range(samples):
        model = ensemble.sample_model(generator)
        start = torch.randn(ensemble.num_streams, ensemble.hidden_size, dtype=torch.float64, generator=generator)
        values = squared_singular_values(exact_jacobian(model, start))
        emp.append(torch.stack([values.mean(), values.square().mean()]))
        cond.append(torch.stack(jacobian_moments(model.coefficients(), ensemble.branch_gain)))
    return torch.stack(emp).mean(0), torch.stack(cond).mean(0)


@pytest.mark.parametrize("depth", [8, 32, pytest.param(64, marks=pytest.mark.slow)])
@pytest.mark.parametrize("mixer", MIXERS)
def test_predicted_moments_match_monte_carlo(mixer, depth):
    hidden = 96 if depth == 64 else 48  # the corrections to the C → ∞ limit grow like depth/C
    ensemble = RandomHyperConnectionEnsemble.with_default_scale(mixer, depth=depth, hidden_size=hidden, branch_gain=0.1)
    empirical, conditional = _monte_carlo(ensemble, samples=2)
    # Given the models' own n×n mixers, the large-C prediction holds for every mixer.
    torch.testing.assert_close(conditional, empirical, rtol=0.10, atol=0.0)
    if mixer != "unconstrained":  # its ensemble mean is carried by rare mixer draws: 2 models cannot estimate it
        predicted = predict_spectrum(ensemble, num_draws=96)
        torch.testing.assert_close(
            torch.tensor([predicted.mean, predicted.second_moment], dtype=torch.float64), empirical, rtol=0.10, atol=0.0
        )


# Real-LM comparisons are paired per model: each prediction uses that model's own mixers and measured branch
# gains, so |err| ≤ max(10%, K_SIGMA · se) with se the standard error of err over models
# (``paired_relative_error``) fails for a predictor bias of more than ~max(10%, K_SIGMA·se) but, for
# near-Gaussian err, for sampling noise only with probability ~0.3%. m₂ is heavy-tailed (a few large
# singular values carry it), so se is itself noisy at 6 models: K_SIGMA = 3 leaves room for that.
K_SIGMA = 3.0
LM_MODELS = 6


def _within(err_se, name):
    err, se = err_se
    assert abs(err) <= max(0.10, K_SIGMA * se), f"{name}: pred/MC − 1 = {err:+.1%} ± {se:.1%} (se over models)"


LM_CASES = [
    pytest.param(mixer, 8, marks=[pytest.mark.xfail(strict=True, reason=(
        "real bias, not noise: m2 pred/MC − 1 = −25% ± 2% (6 models), −24% ± 3% (16 models) at C = 32: finite C "
        "(the highest-gain model's branches made free are already 11–18% above the C → ∞ prediction) plus the "
        "real branches' non-freeness; +2% ± 4% at C = 64; docs/free_probability.md §7, §7.1"))] if mixer == "identity" else [])
    for mixer in MIXERS
] + [pytest.param(mixer, 32, marks=pytest.mark.slow) for mixer in MIXERS]  # fmt: skip


@pytest.mark.parametrize("mixer,depth", LM_CASES)
def test_predicted_moments_match_randomly_initialised_language_models(mixer, depth):
    """Real JPmHC LMs (attention + MLP, pre-RMSNorm): the prediction from each model's measured branch gains and
    κ₄ against the exact per-position Jacobians of the same models (C = 32, 2 positions, 6 models), m₁ and m₂
    each within max(10%, K_SIGMA · se). se is large for m₂ at depth 32 (20–30%: one model's largest singular
    values carry it), so there the check only excludes gross errors; docs/free_probability.md §7 has C = 64.
    """
    ensemble = RandomJPmHCEnsemble.with_default_scale(mixer, depth=depth, hidden_size=32, num_tokens=2)
    generator = torch.Generator().manual_seed(0)
    empirical, predicted, circular = [], [], []
    for _ in range(LM_MODELS):
        model, input_ids = ensemble.sample_model(generator)
        measurement = measure_sites(model, input_ids)
        values = token_spectra(model, input_ids)  # (T, nC)
        empirical.append(torch.stack([values.mean(), values.square().mean()]))
        predicted.append(torch.stack(jacobian_moments(measurement.coefficients, measurement.gain, measurement.kappa4)).mean(-1))
        circular.append(torch.stack(jacobian_moments(measurement.coefficients, measurement.gain)).mean(-1))
    empirical, predicted, circular = (torch.stack(x) for x in (empirical, predicted, circular))  # (models, 2)
    _within(paired_relative_error(predicted[:, 0], empirical[:, 0]), "m1")
    _within(paired_relative_error(predicted[:, 1], empirical[:, 1]), "m2")
    assert (circular[:, 1] < predicted[:, 1]).all()  # attention and MLP Jacobians are not circular: κ₄ > 0 raises m₂


@pytest.mark.parametrize("mixer", MIXERS)
def test_predictor_matches_gaussian_branch_control_at_language_model_gains(mixer):
    """The control for the LM test: one depth-8 LM's measured sites (pre, post, H, g_k, β_k at each position),
    with the real branches replaced by Gaussian ones of the same g_k and β_k (``gaussian_branch_control``,
    64 draws, positions pooled per draw). The predictor's assumptions hold here up to finite C, so m₁ and m₂
    must agree within max(10%, K_SIGMA · se); se ≤ 7% keeps the check sharp enough that dropping β (the
    circular-law prediction, 15–31% low on m₂ here) fails it — asserted, so the test has power.
    """
    ensemble = RandomJPmHCEnsemble.with_default_scale(mixer, depth=8, hidden_size=32, num_tokens=2)
    model, input_ids = ensemble.sample_model(torch.Generator().manual_seed(0))
    measurement = measure_sites(model, input_ids)
    generator = torch.Generator().manual_seed(1)
    tokens = input_ids.numel()
    predicted, empirical, circular = 0, 0, 0
    for t in range(tokens):
        coefficients = SiteCoefficients(*(x[t] for x in (measurement.coefficients.pre, measurement.coefficients.post,
                                                         measurement.coefficients.mixer)))  # fmt: skip
        p, e = gaussian_branch_control(coefficients, measurement.gain[t], measurement.kappa4[t], 32, 64, generator)
        predicted, empirical = predicted + p / tokens, empirical + e / tokens
        batched = SiteCoefficients(*(x[None] for x in (coefficients.pre, coefficients.post, coefficients.mixer)))
        circular = circular + jacobian_moments(batched, measurement.gain[t][None])[1] / tokens
    for k, name in enumerate(("m1", "m2")):
        err, se = paired_relative_error(predicted[:, k], empirical[:, k])
        assert se <= 0.07, f"{name}: se {se:.1%} too large for the check to mean anything"
        _within((err, se), name)
    with pytest.raises(AssertionError):
        _within(paired_relative_error(circular.expand(len(empirical)), empirical[:, 1]), "m2 without β")


@pytest.mark.parametrize("mixer", MIXERS)
def test_predictor_matches_rotated_branch_control_of_language_models(mixer):
    """Depth-8 LMs at C = 64 (6 models), each measured branch Jacobian J_F made free by a Haar rotation of its
    input side (``rotated_branch_control``, 16 draws per position). The rotation keeps every singular value, so
    g_k, β_k and the prediction are the model's own: m₁ and m₂ must match within max(10%, K_SIGMA · se), i.e.
    the recursion is right for free branches with the LMs' exact branch spectra. (At C = 32 the free-branch m₂
    of the highest-gain models is itself 10–20% above the C → ∞ prediction, heavy-tailed over draws: finite C.)
    ``site_product`` of the unrotated blocks must be the Monte-Carlo Jacobian itself.
    """
    ensemble = RandomJPmHCEnsemble.with_default_scale(mixer, depth=8, hidden_size=64, num_tokens=2)
    generator, rotations = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    predicted, rotated = [], []
    for s in range(LM_MODELS):
        model, input_ids = ensemble.sample_model(generator)
        measurement = measure_sites(model, input_ids, keep_blocks=True)
        c = measurement.coefficients
        positions = [SiteCoefficients(c.pre[t], c.post[t], c.mixer[t]) for t in range(input_ids.numel())]
        if s == 0:
            rebuilt = torch.stack([squared_singular_values(site_product(p, b)) for p, b in zip(positions, measurement.blocks)])
            torch.testing.assert_close(rebuilt, token_spectra(model, input_ids), rtol=1e-6, atol=1e-9 * rebuilt.max().item())
        predicted.append(torch.stack(jacobian_moments(c, measurement.gain, measurement.kappa4)).mean(-1))
        rotated.append(torch.stack([rotated_branch_control(p, b, 16, rotations).mean(0)
                                    for p, b in zip(positions, measurement.blocks)]).mean(0))  # fmt: skip
    predicted, rotated = torch.stack(predicted), torch.stack(rotated)  # (models, 2)
    _within(paired_relative_error(predicted[:, 0], rotated[:, 0]), "m1")
    _within(paired_relative_error(predicted[:, 1], rotated[:, 1]), "m2")


def test_paired_relative_error_and_bootstrap():
    empirical = torch.tensor([1.0, 4.0, 2.0, 9.0], dtype=torch.float64)
    assert paired_relative_error(1.1 * empirical, empirical) == pytest.approx((0.1, 0.0), abs=1e-12)
    assert bootstrap_relative_error(1.1 * empirical, empirical) == pytest.approx((0.1, 0.1), abs=1e-12)
    predicted = torch.tensor([1.0, 3.0, 2.0, 12.0], dtype=torch.float64)
    err, se = paired_relative_error(predicted, empirical)
    ratio = predicted.sum() / empirical.sum()
    expected_se = ((predicted - ratio * empirical).square().sum() / 12).sqrt() / empirical.mean()
    assert err == pytest.approx(ratio.item() - 1) and se == pytest.approx(expected_se.item())
    low, high = bootstrap_relative_error(predicted, empirical)
    assert low < err < high
    assert paired_relative_error(predicted[:1], empirical[:1])[1] != paired_relative_error(predicted[:1], empirical[:1])[1]


def test_measured_branch_gain_is_the_pre_norm_formula_for_one_token():
    """One token, layer 0: attention is W_o R W_v RMSNorm(u), so g² = ‖W_o R W_v (I − ûûᵀ/C)‖²_F / (C rms(u)²)."""
    ensemble = RandomJPmHCEnsemble("identity", depth=1, hidden_size=32, num_tokens=1)
    model, input_ids = ensemble.sample_model(torch.Generator().manual_seed(0))
    measurement = measure_sites(model, input_ids)
    attn = model.layers[0].self_attn
    u = model.embed_tokens(input_ids)[0].detach()  # all streams equal the embedding, and pre sums to 1
    rms = (u.square().mean() + model.config.rms_norm_eps).sqrt()
    repeat = attn.num_key_value_groups
    w_v = attn.v_proj.weight.unflatten(0, (-1, attn.head_dim)).repeat_interleave(repeat, 0).flatten(0, 1)
    u_hat = u / u.norm()
    jacobian = attn.o_proj.weight @ w_v @ (torch.eye(32, dtype=u.dtype) - torch.outer(u_hat, u_hat)) / rms
    assert measurement.gain.shape == (1, 2) and measurement.coefficients.mixer.shape == (1, 2, 4, 4)
    assert measurement.gain[0, 0].item() == pytest.approx((jacobian.square().sum() / 32).sqrt().item(), rel=1e-6)


def test_kappa4_enters_the_one_site_second_moment():
    """n = 1, one site: τ(((1 + gw)(1 + gw)*)²) = 1 + 4g² + (2 + β)g⁴ for R-diagonal w with κ₄ = β."""
    g, beta = 0.7, 1.3
    one = torch.ones(1, 1, 1)
    m1, m2 = jacobian_moments(SiteCoefficients(one, one, one.unsqueeze(-1)), g, beta)
    assert m1.item() == pytest.approx(1 + g**2, rel=1e-12)
    assert m2.item() == pytest.approx(1 + 4 * g**2 + (2 + beta) * g**4, rel=1e-12)


def test_moments_reduce_to_the_scalar_residual_formula():
    """n = 1, H = 1, pre = post = 1: J = Π(1 + gW), m₁ = (1 + g²)^K and, for K = 1, m₂ = 1 + 4g² + 2g⁴."""
    g, sites = 0.3, 5
    one = torch.ones(1, sites, 1)
    coefficients = SiteCoefficients(one, one, one.unsqueeze(-1))
    m1, m2 = jacobian_moments(coefficients, g)
    assert m1.item() == pytest.approx((1 + g**2) ** sites, rel=1e-12)
    single = SiteCoefficients(one[:, :1], one[:, :1], one[:, :1, :, None])
    assert jacobian_moments(single, g)[1].item() == pytest.approx(1 + 4 * g**2 + 2 * g**4, rel=1e-12)


def test_predicted_density_matches_histogram_and_moment():
    ensemble = RandomHyperConnectionEnsemble("stiefel", depth=2, hidden_size=96, branch_gain=0.4)
    model = ensemble.sample_model(torch.Generator().manual_seed(3))
    values = squared_singular_values(exact_jacobian(model, torch.randn(4, 96, dtype=torch.float64)))
    coefficients = SiteCoefficients(*(t.unsqueeze(0) for t in (model.pre, model.post, model.mixer)))
    grid = torch.linspace(1e-3, values.max().item() * 1.5, 120, dtype=torch.float64)
    density = jacobian_density(coefficients, 0.4, grid, broadening=0.01, tol=1e-6)[0]
    step = grid[1] - grid[0]
    assert (density.sum() * step).item() == pytest.approx(1.0, abs=0.05)
    # the predicted CDF against the empirical one (Kolmogorov distance)
    cdf = torch.cumsum(density, 0) * step
    empirical_cdf = (values[None, :] <= grid[:, None]).double().mean(1)
    assert (cdf - empirical_cdf).abs().max().item() < 0.08


def test_hutchinson_moments_agree_with_exact():
    ensemble = RandomHyperConnectionEnsemble("sinkhorn", depth=4, hidden_size=32, branch_gain=0.3)
    model = ensemble.sample_model(torch.Generator().manual_seed(1))
    start = torch.randn(4, 32, dtype=torch.float64)
    values = squared_singular_values(exact_jacobian(model, start))
    m1, m2 = jacobian_moment_estimates(model, start, num_probes=256, generator=torch.Generator().manual_seed(2))
    assert m1 == pytest.approx(values.mean().item(), rel=0.1)
    assert m2 == pytest.approx(values.square().mean().item(), rel=0.2)


def test_exact_jacobian_of_the_language_model_matches_finite_differences():
    config = JPmHCConfig(**tiny_llama_kwargs(hidden_size=16, intermediate_size=32, num_hidden_layers=2), num_streams=2,
                         mixer="stiefel")  # fmt: skip
    model = JPmHCForCausalLM(config).double().eval()
    stream_map = model_stream_map(model, torch.tensor([5, 7]))
    start = torch.randn(2, 2, 16, dtype=torch.float64)
    jacobian = exact_jacobian(stream_map, start, chunk_size=20)
    direction = torch.randn_like(start)
    eps = 1e-3  # the coefficients are float32 (SPEC §1): a smaller step would difference their rounding
    with torch.no_grad():
        fd = (stream_map((start + eps * direction)[None]) - stream_map((start - eps * direction)[None])) / (2 * eps)
    torch.testing.assert_close(jacobian @ direction.flatten(), fd.flatten(), rtol=1e-3, atol=1e-4)


def test_stiefel_composite_skip_path_is_orthogonal_at_depth_64():
    ensemble = RandomHyperConnectionEnsemble("stiefel", depth=64, logit_std=1.0)
    mixers = ensemble.sample_coefficients(1, torch.Generator().manual_seed(0)).mixer[0]  # (128, n, n)
    singular = torch.linalg.svdvals(composite_mixers(mixers)[-1])
    torch.testing.assert_close(singular, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-5)


def _random_mixer_model(mixer: str, layers: int, scale: float, **sizes) -> JPmHCForCausalLM:
    config = JPmHCConfig(**tiny_llama_kwargs(num_hidden_layers=layers, **sizes), num_streams=4, mixer=mixer)
    model = JPmHCForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for hc in (layer.attn_hc, layer.mlp_hc):
                hc.bias[-hc.mixer.num_logits :] = scale * torch.randn(hc.mixer.num_logits)
    return model.eval()


def test_amax_gain_grows_for_unconstrained_and_stays_bounded_for_sinkhorn():
    inputs = {"input_ids": torch.randint(3, 128, (2, 6))}
    unconstrained = model_gain(_random_mixer_model("unconstrained", 16, 0.3), **inputs)
    assert unconstrained.composite_forward[-1] > 10 * unconstrained.composite_forward[0]
    assert unconstrained.composite_backward[-1] > 10 * unconstrained.composite_backward[0]

    model = _random_mixer_model("sinkhorn", 16, 1.0)
    report = model_gain(model, **inputs)
    mixers = torch.stack([hc.mixer(hc.bias[-16:].float()) for l in model.model.layers for hc in (l.attn_hc, l.mlp_hc)])
    iteration_error = max((mixers.sum(-1) - 1).abs().max().item(), (mixers.sum(-2) - 1).abs().max().item())
    bound = 1 + len(report.site_names) * iteration_error + 1e-6  # (1 + ε)^K, plus float32 rounding of the products
    assert report.composite_forward.max() <= bound and report.composite_backward.max() <= bound
    assert report.site_names[:2] == ["model.layers.0.attn_hc", "model.layers.0.mlp_hc"]


def test_gain_report_uses_the_transposed_orientation():
    """P = H_1 H_2: with X' = Hᵀ X the streams see H_1 first; a non-symmetric pair tells the orders apart."""
    h1 = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    h2 = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    report = gain_report(torch.stack([h1, h2])[:, None])
    assert report.composite_forward[-1].item() == pytest.approx((h1 @ h2).abs().sum(-1).max().item())
    assert report.composite_forward[-1].item() != pytest.approx((h2 @ h1).abs().sum(-1).max().item())
    with pytest.raises(ValueError, match="mixers must have shape"):
        gain_report(h1)


def test_invalid_ensemble_fields_fail_fast():
    with pytest.raises(ValueError, match="branch_gain"):
        RandomHyperConnectionEnsemble("stiefel", branch_gain=-1.0)
    with pytest.raises(ValueError, match="depth"):
        RandomHyperConnectionEnsemble("stiefel", depth=0)
    with pytest.raises(ValueError, match="mixer='nope'"):
        RandomHyperConnectionEnsemble("nope")


def test_plots_are_written(tmp_path):
    import matplotlib.image

    grid = torch.logspace(-2, 1, 50, dtype=torch.float64)
    panel = SpectrumPanel("stiefel", grid, torch.exp(-grid), torch.rand(200, dtype=torch.float64) + 0.1)
    plot_spectra([panel, panel], str(tmp_path / "spectrum.png"))
    report = gain_report(torch.eye(3).expand(4, 1, 3, 3))
    plot_gains(report, str(tmp_path / "gain.png"))
    for name in ("spectrum.png", "gain.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.shape[0] > 200 and image.shape[1] > 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gain.png", "spectrum.png"]  # no temporary left
    for name in ("spectrum.png", "gain.png"):
        assert_ordinary_permissions(tmp_path / name)


def test_cli_spectrum_and_gain(tmp_path, capsys):
    from hf_jpmhc.cli import main

    main(["spectrum", "--mixer", "stiefel,sinkhorn", "--depth", "2", "--hidden", "16", "--samples", "1",
          "--density-draws", "1", "--output", str(tmp_path / "s.png")])  # fmt: skip
    out = capsys.readouterr().out
    assert "stiefel" in out and "sinkhorn" in out and "m2 MC" in out and (tmp_path / "s.png").exists()
    main(["spectrum", "--branch", "lm", "--mixer", "stiefel", "--depth", "2", "--hidden", "16", "--samples", "2",
          "--output", str(tmp_path / "lm.png"), "--json", str(tmp_path / "lm.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert "measured branch gains" in out and "90% boot" in out and (tmp_path / "lm.png").exists()
    (record,) = json.loads((tmp_path / "lm.json").read_text())
    assert record["mixer"] == "stiefel" and len(record["m2_mc"]) == 2 and len(record["m2_err_boot90"]) == 2
    assert "m2_rot" not in record
    main(["spectrum", "--branch", "lm", "--mixer", "stiefel", "--depth", "2", "--hidden", "16", "--samples", "2",
          "--rotated-control", "2", "--output", str(tmp_path / "lm.png"), "--json", str(tmp_path / "rot.json")])  # fmt: skip
    assert "m2 rot/MC" in capsys.readouterr().out
    (rotated,) = json.loads((tmp_path / "rot.json").read_text())
    assert rotated["m2_mc"] == record["m2_mc"] and len(rotated["m2_rot"]) == 2  # same models with the control

    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(128)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model = _random_mixer_model("unconstrained", 3, 0.3, hidden_size=16, intermediate_size=32)  # N = nC = 64: fast
    model.save_pretrained(tmp_path / "model")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w3").save_pretrained(tmp_path / "model")
    main(["gain", "--model", str(tmp_path / "model"), "--prompt", "w5 w9 w11", "--output", str(tmp_path / "g.png")])
    out = capsys.readouterr().out
    assert "model.layers.2.mlp_hc" in out and (tmp_path / "g.png").exists()
    main(["spectrum", "--model", str(tmp_path / "model"), "--prompt", "w5 w9", "--output", str(tmp_path / "m.png")])
    assert "m2 pred" in capsys.readouterr().out and (tmp_path / "m.png").exists()
    with pytest.raises(SystemExit) as exit_info:  # bad input: one line, exit status 2 (hf_jpmhc.errors)
        main(["spectrum", "--mixer", "stiefel", "--depth", "1", "--logit-std", "big", "--output", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert "hf-jpmhc spectrum: error: --logit-std must be a number" in capsys.readouterr().err
