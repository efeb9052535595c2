"""Our sinkhorn hyper-connection built from transformers' in-tree DeepSeek-V4 mHC reproduces its numbers (SPEC §1):
pre/post/comb, the branch input, the final collapse head, and the full stream update of a real
``DeepseekV4DecoderLayer`` (which fixes the orientation X' = combᵀ X + post ⊗ f) — to 1e-6 in float32."""

import pytest
import torch
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4HyperConnection,
    DeepseekV4HyperHead,
    DeepseekV4Model,
)

from hf_jpmhc import JPmHCConfig
from hf_jpmhc.conversion.deepseek_v4 import (
    hyper_connection_fields_from_deepseek_v4,
    hyper_connection_from_deepseek_v4,
    stream_collapse_from_deepseek_v4,
)
from hf_jpmhc.models.hyper_connection import HyperConnection, StreamCollapse
from tests.conftest import tiny_llama_kwargs

TOL = dict(rtol=1e-6, atol=1e-6)  # float32: values up to ~4 carry ~2 ulp of summation-order rounding
CASES = [
    pytest.param(4, 1e-6, id="n4-eps1e-6"),
    pytest.param(2, 1e-6, id="n2-eps1e-6"),
    pytest.param(4, 1e-2, id="n4-eps1e-2"),  # a large eps, so that mapping it wrongly would show
]



def tiny_deepseek_config(hc_mult: int, hc_eps: float) -> DeepseekV4Config:
    """Two sliding-attention MoE layers, 32 wide: a real DeepSeek-V4 that runs in milliseconds."""
    return DeepseekV4Config(
        vocab_size=64, hidden_size=32, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=4,
        n_shared_experts=1, layer_types=["sliding_attention"] * 2, mlp_layer_types=["moe"] * 2, sliding_window=8,
        o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=4, max_position_embeddings=64,
        hc_mult=hc_mult, hc_eps=hc_eps, hc_sinkhorn_iters=20,
    )  # fmt: skip


@torch.no_grad()
def randomise(module: DeepseekV4HyperConnection | DeepseekV4HyperHead, seed: int) -> None:
    """Non-trivial weights: comb logits of order 1–3, so that comb is far from uniform and non-symmetric."""
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.dim() == 2:  # fn / hc_fn (m, nC): z = x̃ fnᵀ has std ≈ 2 for x̃ of unit rms
            param.copy_(2.0 * noise / param.shape[1] ** 0.5)
        elif param.numel() <= 3:  # scale / hc_scale
            param.copy_(1.0 + 0.3 * noise)
        else:  # base / hc_base
            param.copy_(noise)


def random_streams(n: int, hidden: int, batch_shape: tuple[int, ...] = (2, 5)) -> torch.Tensor:
    """(B, T, n, C) with distinct streams of different scales."""
    return torch.randn(*batch_shape, n, hidden) * torch.linspace(0.5, 2.0, n).view(n, 1)


@pytest.mark.parametrize(("hc_mult", "hc_eps"), CASES)
def test_hyper_connection_matches(hc_mult, hc_eps):
    config = tiny_deepseek_config(hc_mult, hc_eps)
    theirs = DeepseekV4HyperConnection(config)
    randomise(theirs, seed=0)
    ours = hyper_connection_from_deepseek_v4(theirs, config)
    assert isinstance(ours, HyperConnection) and ours.mixer.eps == hc_eps and ours.pre_eps == hc_eps

    streams = random_streams(hc_mult, config.hidden_size)
    post, comb, collapsed = theirs(streams)
    _, our_post, our_mixer = ours.coefficients(streams)
    u, read_post, read_mixer = ours.read(streams)
    if hc_mult > 2:  # every 2×2 doubly-stochastic matrix is symmetric
        assert (comb - comb.transpose(-1, -2)).abs().max() > 0.05, "comb must be non-symmetric for the test to bite"
    torch.testing.assert_close(our_post, post, **TOL)
    torch.testing.assert_close(our_mixer, comb, **TOL)
    torch.testing.assert_close(u, collapsed, **TOL)
    torch.testing.assert_close(read_post, post, **TOL)
    torch.testing.assert_close(read_mixer, comb, **TOL)


@pytest.mark.parametrize(("hc_mult", "hc_eps"), CASES)
def test_hyper_head_matches(hc_mult, hc_eps):
    config = tiny_deepseek_config(hc_mult, hc_eps)
    theirs = DeepseekV4HyperHead(config)
    randomise(theirs, seed=1)
    ours = stream_collapse_from_deepseek_v4(theirs, config)
    assert isinstance(ours, StreamCollapse)
    streams = random_streams(hc_mult, config.hidden_size)
    torch.testing.assert_close(ours(streams), theirs(streams), **TOL)


@pytest.mark.parametrize(("hc_mult", "hc_eps"), CASES)
def test_decoder_layer_stream_update_and_orientation(hc_mult, hc_eps):
    """Run a real DeepSeek-V4 model; replay each decoder layer with our hyper-connections around its own
    attention and MoE outputs: the streams after every layer and the collapsed output must agree."""
    config = tiny_deepseek_config(hc_mult, hc_eps)
    model = DeepseekV4Model(config).eval()
    for seed, module in enumerate(model.modules()):
        if isinstance(module, (DeepseekV4HyperConnection, DeepseekV4HyperHead)):
            randomise(module, seed)

    captured: dict[str, torch.Tensor] = {}

    def keep(name: str, output_index: int | None = None):
        def hook(module, args, output):
            captured[f"{name}.in"] = args[0]
            captured[f"{name}.out"] = output if output_index is None else output[output_index]

        return hook

    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(keep(f"layer{i}"))
        layer.self_attn.register_forward_hook(keep(f"attn{i}", output_index=0))
        layer.mlp.register_forward_hook(lambda module, args, output, i=i: captured.__setitem__(f"mlp{i}.out", output))
        layer.input_layernorm.register_forward_hook(keep(f"attn_norm{i}"))
        layer.post_attention_layernorm.register_forward_hook(keep(f"mlp_norm{i}"))
    model.hc_head.register_forward_hook(keep("head"))

    def distinct_streams(module, args, kwargs):
        """Layer 0 receives n copies of the embedding; give it distinct unit-scale streams instead, so that
        Hᵀ X and H X differ visibly (with equal streams every orientation gives the same result)."""
        streams = args[0]
        return (random_streams(hc_mult, streams.shape[-1], streams.shape[:2]), *args[1:]), kwargs

    model.layers[0].register_forward_pre_hook(distinct_streams, with_kwargs=True)

    ids = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
        for i, layer in enumerate(model.layers):
            attn_hc = hyper_connection_from_deepseek_v4(layer.attn_hc, config)
            mlp_hc = hyper_connection_from_deepseek_v4(layer.ffn_hc, config)
            streams = captured[f"layer{i}.in"]  # (B, T, n, C)
            u, post, mix = attn_hc.read(streams)
            torch.testing.assert_close(u, captured[f"attn_norm{i}.in"], **TOL)
            streams = attn_hc.write(streams, captured[f"attn{i}.out"], post, mix)
            u, post, mix = mlp_hc.read(streams)
            torch.testing.assert_close(u, captured[f"mlp_norm{i}.in"], **TOL)
            before, streams = streams, mlp_hc.write(streams, captured[f"mlp{i}.out"], post, mix)
            torch.testing.assert_close(streams, captured[f"layer{i}.out"], **TOL)
            if hc_mult > 2:  # the control: H instead of Hᵀ is far off, so the match above fixes the orientation
                transposed = mlp_hc.write(before, captured[f"mlp{i}.out"], post, mix.transpose(-1, -2))
                assert (transposed - captured[f"layer{i}.out"]).abs().max() > 1e-2
        head = stream_collapse_from_deepseek_v4(model.hc_head, config)
        torch.testing.assert_close(head(captured["head.in"]), captured["head.out"], **TOL)


def test_deepseek_fields_are_a_valid_config():
    fields = hyper_connection_fields_from_deepseek_v4(tiny_deepseek_config(4, 1e-6))
    config = JPmHCConfig(**tiny_llama_kwargs(**fields))
    assert config.mixer == "sinkhorn" and config.sinkhorn_backward == "unrolled" and config.sinkhorn_eps == 1e-6


def test_shape_mismatch_raises():
    theirs = DeepseekV4HyperConnection(tiny_deepseek_config(4, 1e-6))
    message = r"DeepSeek-V4 parameter fn has shape \(24, 128\); the config implies \(8, 64\)"
    with pytest.raises(ValueError, match=message):
        hyper_connection_from_deepseek_v4(theirs, tiny_deepseek_config(2, 1e-6))
