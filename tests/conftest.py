"""Test environment: offline Hub, Triton in interpreter mode, caches in a temporary HF_HOME; the versions under
test printed with the summary; transformers' deprecation warnings raised through our code fail the test.

Tests marked ``triton`` skip (with the reason) where triton cannot be imported — except under ``CI=true``, where a
missing or broken triton fails them: CI must never pass because the kernels it should test were skipped.
"""

import functools
import importlib.metadata
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

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


REPOSITORY = Path(__file__).resolve().parents[1]
VERSIONED = ("torch", "transformers", "accelerate", "peft", "huggingface_hub", "datasets", "triton", "trl")


def pytest_terminal_summary(terminalreporter) -> None:
    """The versions this run tested, under the summary (CI runs the suite on the newest releases and a subset on the
    lowest declared ones)."""

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    terminalreporter.write_line("versions: " + ", ".join(f"{name} {version(name)}" for name in VERSIONED))


def _our_code_on_stack() -> bool:
    """Whether a frame of this repository's code (not the tests) or of a checkpoint's remote-code copy of it is on
    the current call stack."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if "transformers_modules" in path or (path.startswith(str(REPOSITORY)) and "/tests/" not in path
                                               and "/.venv" not in path):  # fmt: skip
            return True
        frame = frame.f_back
    return False


def _warned_by_transformers() -> bool:
    """Whether the code that called ``warnings.warn`` is transformers' (the warning's own ``filename`` is its
    caller's when transformers warns with ``stacklevel=2``, as its ``deprecate_kwarg`` does)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in (__file__, warnings.__file__):
        frame = frame.f_back
    return frame is not None and f"{os.sep}transformers{os.sep}" in frame.f_code.co_filename


class _DeprecationsFromOurCode(logging.Handler):
    """Collects transformers' deprecation notices — ``warnings`` of DeprecationWarning / FutureWarning raised from
    transformers' files and its logger's records that say "deprecated" — emitted while our code is on the stack."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.found: dict[str, None] = {}  # the distinct notices, in order

    def emit(self, record: logging.LogRecord) -> None:
        if "deprecat" in record.getMessage().lower() and _our_code_on_stack():
            self.found[f"transformers logger: {record.getMessage()}"] = None

    def showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if _warned_by_transformers() and _our_code_on_stack():
            self.found[f"{category.__name__} ({filename}:{lineno}): {message}"] = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Inside pytest's own warning capture: transformers' deprecations reach ``_DeprecationsFromOurCode`` (other
    warnings go on to pytest as usual), and any found fails the test. ``warning_once`` notices are re-armed for
    every test, so that an earlier test cannot hide one."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.warning_once.cache_clear()
    collector, library_logger = _DeprecationsFromOurCode(), logging.getLogger("transformers")
    library_logger.addHandler(collector)
    with warnings.catch_warnings():
        pytest_showwarning = warnings.showwarning

        def showwarning(message, category, *args, **kwargs):
            if issubclass(category, (DeprecationWarning, FutureWarning)):
                collector.showwarning(message, category, *args, **kwargs)
            else:
                pytest_showwarning(message, category, *args, **kwargs)

        warnings.showwarning = showwarning
        warnings.simplefilter("always", DeprecationWarning)
        warnings.simplefilter("always", FutureWarning)
        try:
            result = yield
        finally:
            library_logger.removeHandler(collector)
    if collector.found:
        raise AssertionError("transformers deprecation warnings raised through hf_jpmhc:\n" + "\n".join(collector.found))
    return result


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
