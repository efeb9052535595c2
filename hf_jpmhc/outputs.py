"""Writing what a command produces: atomically, so that a failed run leaves nothing half-written and destroys
nothing, and with the permissions of an ordinary write (0644 files, 0755 directories under the usual umask 022),
not the private 0600 of a temporary file — which is what safetensors' ``save_file`` leaves (it writes to a
temporary file and renames it), and so every ``save_pretrained``.

    atomic_write_text(path, text)                 # a small file (results, metrics, a model card)
    with atomic_path("gain.png") as staging:      # any file written by a library call
        figure.savefig(staging)
    with staged_directory(out, overwrite=False) as staging:   # a directory: a checkpoint
        model.save_pretrained(staging)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_PREFIX = ".tmp-"


def _staging_name(path: Path) -> Path:
    """Where to write ``path`` first: a hidden name keeping its suffix (libraries infer the format from it), in the
    nearest existing ancestor directory — the same filesystem, so the final rename is atomic, and ``path``'s
    missing parents are created only when it is complete."""
    path = path.absolute()
    anchor = next(parent for parent in path.parents if parent.is_dir())
    return anchor / f"{STAGING_PREFIX}{os.getpid()}-{path.name}"


def ordinary_permissions(path: Path) -> None:
    """Give ``path`` and everything under it the mode of an ordinary write under the current umask: files 0666,
    directories 0777, minus the umask (symbolic links are left alone)."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Refuse to replace an existing ``path`` unless ``overwrite``: checked before the work, and again at the end."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A staging file name to write ``path`` to: renamed over ``path`` when the block succeeds, removed if it fails."""
    path = Path(path)
    staging = _staging_name(path)
    try:
        yield staging
        ordinary_permissions(staging)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as staging:
        staging.write_text(text, encoding="utf-8")


@contextmanager
def staged_directory(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """An empty staging directory that becomes ``target`` when the block succeeds (replacing an existing ``target``
    only with ``overwrite``); if the block fails it is removed and ``target`` is left as it was: a failed run
    creates nothing."""
    target = check_output(Path(target).absolute(), overwrite)
    staging = _staging_name(target)
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run with the same pid
    staging.mkdir()
    try:
        yield staging
        ordinary_permissions(staging)
        check_output(target, overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        previous = target.with_name(f"{STAGING_PREFIX}{os.getpid()}-previous-{target.name}")
        if target.exists():
            target.rename(previous)
        staging.rename(target)
        if previous.is_dir():
            shutil.rmtree(previous)
        else:
            previous.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
