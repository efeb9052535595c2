"""Test environment: offline Hub, Triton in interpreter mode, caches in a temporary HF_HOME."""

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


def assert_ordinary_permissions(path, umask: int | None = None) -> None:
    """``path`` and everything under it have the modes of an ordinary write under ``umask`` (default: the
    current one): files 0666 & ~umask (0644 under 022), directories 0777 & ~umask (0755), not tempfile's 0600."""
    from pathlib import Path

    if umask is None:
        umask = os.umask(0)
        os.umask(umask)
    path = Path(path)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        expected = (0o777 if item.is_dir() else 0o666) & ~umask
        assert item.stat().st_mode & 0o777 == expected, f"{item}: {item.stat().st_mode & 0o777:o}, expected {expected:o}"
