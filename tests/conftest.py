"""Test environment: offline Hub, Triton in interpreter mode, caches in a temporary HF_HOME.

Tests marked ``triton`` skip (with the reason) where triton cannot be imported — except under ``CI=true``, where a
missing or broken triton fails them: CI must never pass because the kernels it should test were skipped.
"""

import functools
import os
import tempfile

# Before anything imports triton or huggingface_hub.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_jpmhc_test_home_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def in_ci() -> bool:
    """True under a CI runner (GitHub Actions, GitLab, ... set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@functools.cache
def triton_problem() -> str | None:
    """Why the Triton kernels cannot run here, or None: triton must import (on CPU, under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as error:  # noqa: BLE001 — a broken install raises more than ImportError
        return f"triton is not importable ({type(error).__name__}: {error})"
    return None


def pytest_runtest_setup(item):
    if item.get_closest_marker("triton") is None or (problem := triton_problem()) is None:
        return
    if in_ci():
        pytest.fail(f"{problem}; under CI=true the Triton tests must run: install hf_jpmhc[triton]", pytrace=False)
    pytest.skip(f"{problem}: the fused kernels cannot run")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """One intra-op thread: the test models are tiny, and on a shared 2-core machine thread hand-offs made
    small matmuls 10–100× slower (measured by several areas' tests); results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama_kwargs(**overrides) -> dict:
    """A small Llama-shaped config (GQA) that runs in milliseconds; shared by the LM tests."""
    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return kwargs
