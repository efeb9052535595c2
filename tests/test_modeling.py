"""JPmHC causal LM (SPEC §1, §3) against transformers' machinery: Llama equivalence, generation with and without
cache, attention backends, gradient checkpointing, save → load through the Auto classes, bf16 loading,
``output_hidden_states``, sequence classification and symmetry breaking — for every mixer, on a tiny model.

``output_hidden_states`` (decided here): a tuple of ``num_hidden_layers + 1`` tensors, transformers' Llama
convention with the streams kept. Entry l < L is the residual state entering decoder layer l, i.e. all n
streams ``(B, T, n, C)`` (entry 0 is the expanded embedding); the last entry is ``last_hidden_state``
``(B, T, C)``, the collapsed and normed output that the LM head reads.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

import hf_jpmhc  # noqa: F401  (registers the Auto classes)
from hf_jpmhc import JPmHCConfig, JPmHCForCausalLM, JPmHCForSequenceClassification
from hf_jpmhc.models import hyper_connection
from hf_jpmhc.models.hyper_connection import is_hyper_connection_parameter
from hf_jpmhc.models.mixers import MIXERS
from tests.conftest import tiny_llama_kwargs

NUM_STREAMS = 4  # valid for every mixer (kronecker needs a power of 2, permutation n ≤ 6)
ALL_MIXERS = [pytest.param(name, id=name) for name in MIXERS]


def tiny_config(mixer: str, **overrides) -> JPmHCConfig:
    return JPmHCConfig(**tiny_llama_kwargs(num_streams=NUM_STREAMS, mixer=mixer, **overrides))


def perturb_hyper_connections(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every hyper-connection parameter off its (function-preserving) init, so that pre, post and H
    are input dependent, the streams differ and H is far from the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not is_hyper_connection_parameter(name):
                continue
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("phi"):
                param.copy_(0.05 * noise)
            elif name.endswith("alpha"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.add_(0.5 * noise)
    return model


def tiny_model(mixer: str, **overrides) -> JPmHCForCausalLM:
    return perturb_hyper_connections(JPmHCForCausalLM(tiny_config(mixer, **overrides))).eval()


def token_batch(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))



@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """mixer → (saved directory, the model saved there); saved once per mixer for the tests that load."""
    saved = {}

    def get(mixer: str):
        if mixer not in saved:
            model = tiny_model(mixer)
            directory = tmp_path_factory.mktemp(f"ckpt-{mixer}")
            model.save_pretrained(directory)
            saved[mixer] = directory, model
        return saved[mixer]

    return get


# ----------------------------------------------------------------------------------------------------
# function preservation (SPEC §3)
# ----------------------------------------------------------------------------------------------------


def llama_and_converted(num_streams: int, mixer: str) -> tuple[LlamaForCausalLM, JPmHCForCausalLM]:
    llama = LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs())).eval()
    with torch.no_grad():  # non-trivial norm weights, so a wrong norm placement would show
        for name, param in llama.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model = JPmHCForCausalLM(JPmHCConfig(**tiny_llama_kwargs(num_streams=num_streams, mixer=mixer))).eval()
    result = model.load_state_dict(llama.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(is_hyper_connection_parameter(k) for k in result.missing_keys)
    return llama, model


def test_single_stream_identity_is_llama():
    llama, model = llama_and_converted(1, "identity")
    ids = token_batch()
    torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_initialisation_is_function_preserving(mixer):
    """SPEC §3: at init every mixer's n = 4 model computes the Llama's logits (and its greedy tokens)."""
    llama, model = llama_and_converted(NUM_STREAMS, mixer)
    ids = token_batch()
    torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=0, atol=1e-5)
    generate = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(model.generate(ids, **generate), llama.generate(ids, **generate))


# ----------------------------------------------------------------------------------------------------
# transformers machinery, per mixer
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_generate_with_and_without_cache(mixer):
    model = tiny_model(mixer)
    ids = token_batch(length=5)
    generate = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with_cache = model.generate(ids, use_cache=True, **generate)
    without_cache = model.generate(ids, use_cache=False, **generate)
    assert with_cache.shape == (2, 15)
    assert torch.equal(with_cache, without_cache)


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_eager_and_sdpa_agree(mixer):
    model = tiny_model(mixer)
    ids = token_batch(length=9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    logits = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        logits[implementation] = model(ids, attention_mask=mask).logits
    keep = mask.bool()  # padded query rows are undefined
    torch.testing.assert_close(logits["sdpa"][keep], logits["eager"][keep], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_gradient_checkpointing_same_gradients(mixer):
    model = tiny_model(mixer).train()
    ids = token_batch(length=12)
    calls = []
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        calls.clear()
        model(ids, labels=ids).loss.backward()
        return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}

    plain = gradients()
    assert len(calls) == 1
    model.gradient_checkpointing_enable()
    checkpointed = gradients()
    assert len(calls) == 2, "the first layer must be recomputed in the backward"
    assert plain.keys() == checkpointed.keys()
    assert any(is_hyper_connection_parameter(name) for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_save_load_exact(mixer, checkpoints):
    directory, model = checkpoints(mixer)
    loaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert type(loaded) is JPmHCForCausalLM and loaded.config.mixer == mixer
    reference = model.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    # the mixers' constant bases are non-persistent buffers, rebuilt by _init_weights after loading
    buffers = dict(model.named_buffers())
    for name, buffer in loaded.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    ids = token_batch()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_bfloat16_load_keeps_hyper_connections_float32(mixer, checkpoints):
    directory, model = checkpoints(mixer)
    loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    dtypes = {name: param.dtype for name, param in loaded.named_parameters()}
    hc = {name: dtype for name, dtype in dtypes.items() if is_hyper_connection_parameter(name)}
    assert hc and set(hc.values()) == {torch.float32}, hc
    rest = {dtype for name, dtype in dtypes.items() if not is_hyper_connection_parameter(name)}
    assert rest == {torch.bfloat16}
    # fp32 coefficients read exactly the bf16 checkpoint values
    for name, param in loaded.named_parameters():
        if is_hyper_connection_parameter(name):
            assert torch.equal(param, model.state_dict()[name]), name

    ids = token_batch()
    out = loaded(ids, output_hidden_states=True)
    assert out.logits.dtype == torch.bfloat16 and out.logits.isfinite().all()
    assert all(h.dtype == torch.bfloat16 for h in out.hidden_states)
    reference = model(ids).logits
    assert (out.logits.float() - reference).abs().max() < 0.1 * reference.abs().max()
    generated = loaded.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (2, ids.shape[1] + 4)


@pytest.mark.parametrize("mixer", ["sinkhorn", "grassmann"])
def test_static_coefficients_and_mean_collapse(mixer, tmp_path):
    """``dynamic=False`` (no Φ) with the fixed-mean collapse: generation with/without cache and save → load."""
    model = tiny_model(mixer, dynamic=False, hc_collapse="mean")
    assert all(not name.endswith("phi") for name, _ in model.named_parameters())
    assert model.model.stream_collapse.phi is None
    ids = token_batch(length=5)
    generate = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    generated = model.generate(ids, use_cache=True, **generate)
    assert torch.equal(generated, model.generate(ids, use_cache=False, **generate))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not loaded.config.dynamic and loaded.config.hc_collapse == "mean"
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("mixer", ["identity", "sinkhorn", "stiefel"])
def test_output_hidden_states_shapes(mixer):
    model = tiny_model(mixer)
    ids = token_batch(length=7)
    out = model(ids, output_hidden_states=True)
    layers, n, hidden = model.config.num_hidden_layers, NUM_STREAMS, model.config.hidden_size
    assert len(out.hidden_states) == layers + 1
    for state in out.hidden_states[:-1]:
        assert state.shape == (2, 7, n, hidden)
    embeddings = model.model.embed_tokens(ids)
    torch.testing.assert_close(out.hidden_states[0], embeddings.unsqueeze(-2).expand(-1, -1, n, -1))
    assert out.hidden_states[-1].shape == (2, 7, hidden)
    base = model.model(ids)
    torch.testing.assert_close(out.hidden_states[-1], base.last_hidden_state)
    torch.testing.assert_close(out.logits, model.lm_head(base.last_hidden_state))


@pytest.mark.parametrize("mixer", ["sinkhorn", "stiefel", "kronecker"])
def test_sequence_classification(mixer, checkpoints):
    directory, causal = checkpoints(mixer)
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=3).eval()
    assert isinstance(model, JPmHCForSequenceClassification)
    assert torch.equal(model.model.embed_tokens.weight, causal.model.embed_tokens.weight)
    ids = token_batch(length=6)
    ids[0, 4:] = model.config.pad_token_id  # right padding: the score is read at the last real token
    out = model(ids, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.isfinite()
    out.loss.backward()
    assert model.model.layers[0].attn_hc.bias.grad is not None
    # the padded row scores its last real token: appending more padding changes nothing
    longer = torch.cat([ids, torch.full((2, 2), model.config.pad_token_id)], dim=1)
    longer[1, 6:] = ids[1, -1]  # keep row 1 unpadded by repeating a real token
    torch.testing.assert_close(model(longer).logits[0], out.logits[0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# symmetry breaking (SPEC §3)
# ----------------------------------------------------------------------------------------------------


def stream_spread(model: JPmHCForCausalLM, ids: torch.Tensor) -> float:
    """max over layers of max|X_s − mean_s X| / max|X|, from the streams entering each layer l ≥ 1."""
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states[1:-1]
    return max(((s - s.mean(-2, keepdim=True)).abs().max() / s.abs().max()).item() for s in states)


def train_steps(model: JPmHCForCausalLM, ids: torch.Tensor, steps: int = 5) -> None:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_symmetry_breaking(mixer):
    model = JPmHCForCausalLM(tiny_config(mixer, num_hidden_layers=3))
    ids = token_batch(batch=4, length=16)
    assert stream_spread(model, ids) <= 1e-6, "streams must be equal at initialisation"
    train_steps(model, ids)
    assert stream_spread(model, ids) > 1e-3, "streams still equal after training: symmetry not broken"


def test_without_home_stream_the_streams_stay_equal(monkeypatch):
    """The control: with pre uniform (no home stream) identical streams get identical updates forever."""
    monkeypatch.setattr(hyper_connection, "HOME_STREAM_WEIGHT", 0.0)
    model = JPmHCForCausalLM(JPmHCConfig(**tiny_llama_kwargs(num_streams=NUM_STREAMS, mixer="sinkhorn")))
    ids = token_batch(batch=4, length=16)
    train_steps(model, ids)
    assert stream_spread(model, ids) <= 1e-4
