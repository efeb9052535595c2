"""Every invalid hyper-connection value fails at ``JPmHCConfig`` construction with a ValueError that names the
field and what it accepts; valid values (and the paper aliases) construct and round-trip through JSON."""

import dataclasses

import pytest

from hf_jpmhc import JPmHCConfig
from hf_jpmhc.models.configuration_hyper_connection import HyperConnectionConfig
from tests.conftest import tiny_llama_kwargs

# field → [(invalid overrides, regex the message must match: the field's name and what it accepts)]
INVALID = {
    "num_streams": [
        ({"num_streams": 0}, r"num_streams must be an integer >= 1, got 0"),
        ({"num_streams": -2}, r"num_streams must be an integer >= 1, got -2"),
        ({"num_streams": 2.5}, r"num_streams must be an integer >= 1, got 2\.5"),
        ({"num_streams": "4"}, r"num_streams must be an integer >= 1, got '4'"),
        ({"num_streams": True}, r"num_streams must be an integer >= 1, got True"),
    ],
    "mixer": [
        ({"mixer": "orthogonal"}, r"mixer='orthogonal' is not a known mixer\. Valid values: .*sinkhorn.*stiefel"),
        ({"mixer": 3}, r"mixer=3 is not a known mixer\. Valid values: "),
        ({"mixer": None}, r"mixer=None is not a known mixer\. Valid values: "),
        ({"mixer": "permutation", "num_streams": 7}, r"mixer='permutation' needs num_streams <= 6"),
        ({"mixer": "kronecker", "num_streams": 6}, r"mixer='kronecker' needs num_streams to be a power of 2"),
        ({"mixer": "spectral", "num_streams": 1}, r"mixer='spectral' needs num_streams >= 2"),
        ({"mixer": "transport", "num_streams": 1}, r"mixer='transport' needs num_streams >= 2"),
        ({"mixer": "grassmann", "num_streams": 1}, r"mixer='grassmann' needs num_streams >= 2"),
    ],
    "dynamic": [
        ({"dynamic": "yes"}, r"dynamic must be True or False, got 'yes'"),
        ({"dynamic": 1}, r"dynamic must be True or False, got 1"),
    ],
    "sinkhorn_iters": [
        ({"sinkhorn_iters": 0}, r"sinkhorn_iters must be an integer >= 1, got 0"),
        ({"sinkhorn_iters": 2.5}, r"sinkhorn_iters must be an integer >= 1, got 2\.5"),
    ],
    "sinkhorn_newton_steps": [
        ({"sinkhorn_newton_steps": -1}, r"sinkhorn_newton_steps must be an integer >= 0, got -1"),
        ({"sinkhorn_newton_steps": None}, r"sinkhorn_newton_steps must be an integer >= 0, got None"),
    ],
    "sinkhorn_backward": [
        ({"sinkhorn_backward": "adjoint"}, r"sinkhorn_backward must be one of 'implicit', 'unrolled', got 'adjoint'"),
    ],
    "sinkhorn_eps": [
        ({"sinkhorn_eps": -1e-6}, r"sinkhorn_eps must be a finite number >= 0\.0, got -1e-06"),
        ({"sinkhorn_eps": float("nan")}, r"sinkhorn_eps must be a finite number >= 0\.0, got nan"),
        ({"sinkhorn_eps": "1e-6"}, r"sinkhorn_eps must be a finite number >= 0\.0, got '1e-6'"),
        (
            {"mixer": "sinkhorn", "sinkhorn_eps": 1e-6, "sinkhorn_backward": "implicit"},
            r"sinkhorn_eps > 0 .* set sinkhorn_backward='unrolled' or sinkhorn_eps=0",
        ),
    ],
    "cayley_method": [
        ({"cayley_method": "exp"}, r"cayley_method must be one of 'solve', 'iterative', got 'exp'"),
    ],
    "cayley_iters": [
        ({"cayley_iters": 0}, r"cayley_iters must be an integer >= 1, got 0"),
    ],
    "grassmann_rank": [
        ({"mixer": "grassmann", "num_streams": 4, "grassmann_rank": 0}, r"grassmann_rank must be in 1\.\..* = 1\.\.3, got 0"),
        ({"mixer": "grassmann", "num_streams": 4, "grassmann_rank": 4}, r"grassmann_rank must be in 1\.\..* = 1\.\.3, got 4"),
        ({"mixer": "grassmann", "num_streams": 4, "grassmann_rank": 1.5}, r"grassmann_rank must be None or an integer"),
        ({"mixer": "stiefel", "grassmann_rank": 2}, r"grassmann_rank only applies to mixer='grassmann'"),
    ],
    "hc_alpha_init": [
        ({"hc_alpha_init": 0.0}, r"hc_alpha_init must be > 0"),
        ({"hc_alpha_init": -0.01}, r"hc_alpha_init must be a finite number >= 0\.0, got -0\.01"),
        ({"hc_alpha_init": float("inf")}, r"hc_alpha_init must be a finite number >= 0\.0, got inf"),
    ],
    "hc_pre_eps": [
        ({"hc_pre_eps": -1.0}, r"hc_pre_eps must be a finite number >= 0\.0, got -1\.0"),
        ({"hc_pre_eps": float("nan")}, r"hc_pre_eps must be a finite number >= 0\.0, got nan"),
    ],
    "hc_collapse": [
        ({"hc_collapse": "sum"}, r"hc_collapse must be one of 'learned', 'mean', got 'sum'"),
    ],
    "kernel_backend": [
        ({"kernel_backend": "cuda"}, r"kernel_backend must be one of 'auto', 'torch', 'triton', 'compiled', got 'cuda'"),
    ],
    "hc_recompute": [
        ({"hc_recompute": "true"}, r"hc_recompute must be True or False, got 'true'"),
    ],
}


def test_every_field_has_invalid_cases():
    """Adding a hyper-connection field without teaching this file its invalid values fails here."""
    assert set(INVALID) == {field.name for field in dataclasses.fields(HyperConnectionConfig)}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(overrides, message, id=f"{field}-{i}")
        for field, cases in INVALID.items()
        for i, (overrides, message) in enumerate(cases)
    ],
)
def test_invalid_value_raises_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        JPmHCConfig(**tiny_llama_kwargs(**overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"num_streams": 1, "mixer": "identity"}, id="plain-residual"),
        pytest.param({"num_streams": 4, "mixer": "mhc", "sinkhorn_backward": "unrolled", "sinkhorn_eps": 1e-6},
                     id="deepseek-sinkhorn"),
        pytest.param({"num_streams": 6, "mixer": "mhc-lite"}, id="permutation-n6"),
        pytest.param({"num_streams": 8, "mixer": "KromHC"}, id="kronecker-n8"),
        pytest.param({"num_streams": 4, "mixer": "grassmann", "grassmann_rank": 2, "dynamic": False},
                     id="grassmann-p2-static"),
        pytest.param({"num_streams": 4, "mixer": "jpmhc", "cayley_method": "iterative", "hc_collapse": "mean"},
                     id="stiefel-iterative"),
    ],
)
def test_valid_config_round_trips(overrides, tmp_path):
    config = JPmHCConfig(**tiny_llama_kwargs(**overrides))
    assert config.model_type == "jpmhc"
    config.save_pretrained(tmp_path)
    reloaded = JPmHCConfig.from_pretrained(tmp_path)
    for field in dataclasses.fields(HyperConnectionConfig):
        assert getattr(reloaded, field.name) == getattr(config, field.name), field.name


@pytest.mark.parametrize(("alias", "canonical"), [("mhc", "sinkhorn"), ("cayley", "stiefel"), ("TBP", "transport")])
def test_alias_is_canonicalised(alias, canonical):
    assert JPmHCConfig(**tiny_llama_kwargs(mixer=alias)).mixer == canonical
