"""H dynamics (hf_jpmhc.diagnostics.dynamics), the identity-degeneration warning, the hyper-connections' optimiser
groups and the analytic FLOP counts (hf_jpmhc.diagnostics.flops)."""

import math
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from hf_jpmhc import JPmHCConfig, JPmHCForCausalLM
from hf_jpmhc.diagnostics import model_gain
from hf_jpmhc.diagnostics.dynamics import (
    DynamicsMonitor,
    IdentityDegenerationWarning,
    initial_mixer,
    measure_dynamics,
)
from hf_jpmhc.diagnostics.flops import dense_flops, hyper_connection_flops, mixer_flops
from hf_jpmhc.models.hyper_connection import HOME_STREAM_WEIGHT
from tests.conftest import tiny_llama_kwargs
from training.common import build_optimizer, build_scheduler, hyper_connection_parameters

N = 4


def tiny(mixer: str, **overrides) -> JPmHCForCausalLM:
    return JPmHCForCausalLM(JPmHCConfig(**tiny_llama_kwargs(**overrides), num_streams=N, mixer=mixer)).eval()


def sites(model):
    return [hc for layer in model.model.layers for hc in (layer.attn_hc, layer.mlp_hc)]


def probe():
    return {"input_ids": torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))}


@torch.no_grad()
def move(hc, scale: float = 1.0, seed: int = 0) -> None:
    """Random residual logits b_res at one site: H leaves its initialisation."""
    r = hc.mixer.num_logits
    hc.bias[-r:] = scale * torch.randn(r, generator=torch.Generator().manual_seed(seed))


def test_metrics_at_initialisation_are_the_closed_forms():
    for mixer in ("sinkhorn", "stiefel"):
        report = measure_dynamics(tiny(mixer), probe())
        record = report.record()
        assert record["hc/h_dist_init"] == pytest.approx(0.0, abs=1e-6)
        # Sinkhorn starts at SK(exp 4I), not I: its diagonal is e⁴/(e⁴ + 3) (doubly stochastic by symmetry)
        diagonal = math.exp(4) / (math.exp(4) + N - 1)
        expected = math.sqrt(N * (1 - diagonal) ** 2 + N * (N - 1) * ((1 - diagonal) / (N - 1)) ** 2)
        assert record["hc/h_dist_identity"] == pytest.approx(expected if mixer == "sinkhorn" else 0.0, abs=1e-6)
        home = (1 - HOME_STREAM_WEIGHT) / N + HOME_STREAM_WEIGHT
        rest = (1 - HOME_STREAM_WEIGHT) / N
        pre_entropy = -(home * math.log(home) + (N - 1) * rest * math.log(rest))
        assert record["hc/pre_entropy"] == pytest.approx(pre_entropy, rel=1e-3)  # σ(logit(p)) rounds at 1e-4
        assert record["hc/post_entropy"] == pytest.approx(math.log(N), abs=1e-6)  # post = 1 everywhere
        assert record["hc/amax"] == pytest.approx(1.0, abs=1e-6) and record["hc/h_norm"] == pytest.approx(1.0, abs=1e-6)
        assert record["hc/alpha_res"] == pytest.approx(0.01)
        assert record["hc/0.attn_hc/h_dist_init"] == pytest.approx(0.0, abs=1e-6)


def test_metrics_follow_a_moved_mixer_site_by_site():
    model = tiny("stiefel")
    hc = model.model.layers[1].attn_hc
    move(hc, scale=0.5)
    move(model.model.layers[0].mlp_hc, scale=0.5, seed=1)  # two rotations: their product is not either one
    report = measure_dynamics(model, probe())
    record = report.record()
    moved = hc.mixer(hc.bias[-hc.mixer.num_logits :].float()).double()  # Φ = 0: the same H for every token
    assert record["hc/1.attn_hc/h_dist_init"] == pytest.approx(torch.linalg.matrix_norm(moved - initial_mixer(hc)).item(), rel=1e-5)
    assert record["hc/1.attn_hc/h_dist_identity"] == pytest.approx(record["hc/1.attn_hc/h_dist_init"], rel=1e-6)
    assert record["hc/0.attn_hc/h_dist_init"] == pytest.approx(0.0, abs=1e-6)
    assert record["hc/h_dist_init_min"] == pytest.approx(0.0, abs=1e-6)  # stiefel's first site can move: it counts
    assert record["hc/orth_residual"] < 1e-5  # Stiefel stays orthogonal…
    assert record["hc/row_residual"] > 0.1  # …but not stochastic
    gains = model_gain(model, **probe())  # the composite gain is SPEC §4's, maximised over depth and tokens
    assert record["hc/amax_forward"] == pytest.approx(gains.composite_forward.max().item(), rel=1e-6)
    assert record["hc/amax_backward"] == pytest.approx(gains.composite_backward.max().item(), rel=1e-6)
    # the case tells the composite from the sites: the product of the two rotations has another gain than either
    assert gains.composite_forward.max().item() != pytest.approx(gains.site_forward.max().item(), rel=1e-3)


def test_degeneration_warning_names_the_sites_that_did_not_move():
    model = tiny("sinkhorn")
    monitor = DynamicsMonitor(model, probe(), degeneration_threshold=0.01, degeneration_step=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IdentityDegenerationWarning)
        monitor(model, 4)  # before the check: no warning
    move(model.model.layers[0].mlp_hc, scale=3.0)
    with torch.no_grad():  # sHC's identity degeneration: H has moved from SK(exp 4I), onto I itself
        model.model.layers[1].mlp_hc.bias[-N * N :] = (20 * torch.eye(N)).flatten()
    with pytest.warns(IdentityDegenerationWarning) as caught:
        record = monitor(model, 5)
    (message,) = [str(w.message) for w in caught if w.category is IdentityDegenerationWarning]
    assert "2 of 4 sites" in message and "1.attn_hc, 1.mlp_hc" in message and "--hc_lr_scale" in message
    # the first site reads n equal copies of the embedding: no doubly-stochastic H gets a gradient there, so it
    # is not reported; the moved site is not either
    assert "0.attn_hc" not in message and "0.mlp_hc" not in message
    assert record["hc/unmoved_sites"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", IdentityDegenerationWarning)
        monitor(model, 6)  # warned once

    for hc in sites(model)[1:]:
        move(hc, scale=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IdentityDegenerationWarning)
        record = DynamicsMonitor(model, probe(), degeneration_step=0)(model, 0)
    assert record["hc/unmoved_sites"] == 0


def test_stiefel_first_site_is_checked():
    """An orthogonal H changes even equal streams (Hᵀ1 ≠ 1), so its first site can and must move."""
    model = tiny("stiefel")
    with pytest.warns(IdentityDegenerationWarning, match=r"4 of 4 sites: 0\.attn_hc"):
        DynamicsMonitor(model, probe(), degeneration_step=0)(model, 0)


def test_hyper_connection_optimizer_groups():
    model = tiny("sinkhorn")
    hc = {id(p) for p in hyper_connection_parameters(model)}
    assert len(hc) == 3 * len(sites(model)) + 3  # Φ, b, α per site and in the collapse head
    default = build_optimizer(model, learning_rate=1e-3, weight_decay=0.1)
    assert [(g["lr"], g["weight_decay"]) for g in default.param_groups] == [(1e-3, 0.1), (1e-3, 0.0)]

    lever = build_optimizer(model, learning_rate=1e-3, weight_decay=0.1, hc_lr_scale=10, hc_weight_decay=0.0)
    for group in lever.param_groups:
        in_hc = {id(p) in hc for p in group["params"]}
        assert len(in_hc) == 1, "a group mixes hyper-connection and other parameters"
        assert group["lr"] == pytest.approx(1e-2 if in_hc == {True} else 1e-3)
        assert group["weight_decay"] == (0.0 if in_hc == {True} else group["weight_decay"])
    assert sum(len(g["params"]) for g in lever.param_groups) == len(list(model.parameters()))
    scheduler = build_scheduler(lever, "cosine", warmup_steps=2, max_steps=10)
    for _ in range(5):
        lever.step(), scheduler.step()
    rates = {len(g["params"]): g["lr"] for g in lever.param_groups}
    assert max(rates.values()) / min(rates.values()) == pytest.approx(10)  # the schedule keeps the ratio


@pytest.mark.parametrize("mixer", ["identity", "sinkhorn"])
def test_flop_counts_match_torch_flop_counter(mixer):
    """The matrix products of the analytic count, checked against torch's FlopCounterMode (which counts mm/bmm/
    addmm and attention, not elementwise ops, the RMS or the mixer's solves): the JPmHC forward minus the Llama
    forward of the same shape must be exactly the hyper-connections' projections, collapses and Hᵀ X."""
    kwargs = tiny_llama_kwargs()
    jpmhc, llama = tiny(mixer), LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    ids = torch.randint(3, 128, (2, 8))

    def counted(model):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids=ids)
        return counter.get_total_flops() / ids.numel()

    c, layers = kwargs["hidden_size"], kwargs["num_hidden_layers"]
    elementwise = 2 * layers * (2 * N * c + 2 * N * c) + 2 * N * c  # RMS and post ⊗ f per site, the head's RMS
    mixer_maps = 2 * layers * mixer_flops(mixer, N)  # Sinkhorn's rounds and Newton solves: no matrix products
    assert counted(jpmhc) - counted(llama) == hyper_connection_flops(jpmhc.config) - elementwise - mixer_maps
    assert counted(llama) == dense_flops(llama, context=0)  # the Linear layers; FlopCounterMode counts no CPU attention
