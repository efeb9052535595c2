"""Where task data comes from: the Hugging Face Hub first, then the offline cache of ``python -m eval.prepare``.

Every task's rows are normalised to one JSONL schema, whichever the source (see each task module), and
live in the cache as ``<data_dir>/<task>/<split>.jsonl`` with ``data_dir`` = ``$HF_JPMHC_CACHE/eval`` by
default. ``source="auto"`` tries the Hub and falls back to the cache with a message; under
``HF_HUB_OFFLINE=1`` the Hub attempt is skipped at once instead of timing out.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

SOURCES = ("auto", "hub", "cache")
PREPARE_COMMAND = "python -m eval.prepare"


class DataUnavailableError(FileNotFoundError):
    """Neither the Hub nor the offline cache could provide a task's data (a user error: the message says what to run)."""


def default_data_dir() -> Path:
    from hf_jpmhc.data import cache_dir

    return cache_dir() / "eval"


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_DATASETS_OFFLINE", "0").upper() in {"1", "ON", "YES", "TRUE"}


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP probe of the Hub endpoint per process, so an unreachable Hub costs seconds, not
    huggingface_hub's retry back-off (about 25 s per dataset)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows atomically (aside, then rename); returns the number written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    with staging.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    staging.replace(path)
    return count


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_rows(
    task: str,
    split: str,
    *,
    hub: Callable[[], list[dict]] | None,
    data_dir: Path | None = None,
    source: str = "auto",
) -> tuple[list[dict], str]:
    """Rows of ``task``/``split`` and where they came from (a Hub name or the cache file).

    ``hub()`` loads and normalises the Hub copy; ``hub=None`` means the data has no Hub source.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    cached = Path(data_dir or default_data_dir()) / task / f"{split}.jsonl"
    if source in ("auto", "hub"):
        if hub is None:
            reason = "it has no Hub source"
            if source == "hub":
                raise DataUnavailableError(f"{task}: {reason}; use source='cache'")
        elif hub_offline() and source == "auto":
            reason = "HF_HUB_OFFLINE is set"
        elif not hub_reachable() and source == "auto":
            reason = "the Hub endpoint does not answer"
        else:
            try:
                return hub(), "hub"
            except Exception as error:  # any Hub failure falls back to the cache
                if source == "hub":
                    raise DataUnavailableError(f"{task}/{split}: could not load from the Hub: {error}") from error
                reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if cached.is_file():
            print(f"[eval] {task}/{split}: Hub unavailable ({reason}); using the offline copy {cached}", file=sys.stderr)
    if cached.is_file():
        return read_jsonl(cached), str(cached)
    raise DataUnavailableError(
        f"{task}/{split}: no data. The Hub is unreachable and the offline cache has no {cached}. "
        f"Run `{PREPARE_COMMAND} --tasks {task}` (add `--data-dir {cached.parent.parent}` if you use a custom directory)."
    )
