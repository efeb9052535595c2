"""Stability diagnostics: free-probability prediction vs Monte-Carlo Jacobians, Amax gains, plots, CLI."""

import pytest
import torch

from hf_jpmhc import JPmHCConfig, JPmHCForCausalLM
from hf_jpmhc.diagnostics import (
    RandomHyperConnectionEnsemble,
    SiteCoefficients,
    composite_mixers,
    exact_jacobian,
    gain_report,
    jacobian_density,
    jacobian_moment_estimates,
    jacobian_moments,
    model_gain,
    model_stream_map,
    predict_spectrum,
    squared_singular_values,
)
from hf_jpmhc.diagnostics.plots import SpectrumPanel, plot_gains, plot_spectra
from tests.conftest import tiny_llama_kwargs

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


@pytest.mark.parametrize("depth", [8, 32, 64])
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


def _random_mixer_model(mixer: str, layers: int, scale: float) -> JPmHCForCausalLM:
    model = JPmHCForCausalLM(JPmHCConfig(**tiny_llama_kwargs(num_hidden_layers=layers), num_streams=4, mixer=mixer))
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


def test_cli_spectrum_and_gain(tmp_path, capsys):
    from hf_jpmhc.cli import main

    main(["spectrum", "--mixer", "stiefel,sinkhorn", "--depth", "2", "--hidden", "16", "--samples", "1",
          "--density-draws", "1", "--output", str(tmp_path / "s.png")])  # fmt: skip
    out = capsys.readouterr().out
    assert "stiefel" in out and "sinkhorn" in out and "m2 MC" in out and (tmp_path / "s.png").exists()

    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(128)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model = _random_mixer_model("unconstrained", 3, 0.3)
    model.save_pretrained(tmp_path / "model")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w3").save_pretrained(tmp_path / "model")
    main(["gain", "--model", str(tmp_path / "model"), "--prompt", "w5 w9 w11", "--output", str(tmp_path / "g.png")])
    out = capsys.readouterr().out
    assert "model.layers.2.mlp_hc" in out and (tmp_path / "g.png").exists()
    with pytest.raises(ValueError, match="--logit-std"):
        main(["spectrum", "--mixer", "stiefel", "--depth", "1", "--logit-std", "big", "--output", str(tmp_path / "x.png")])
