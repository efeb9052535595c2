"""Pieces shared by every converter (Llama, ViT): options, weight transfer, progress, atomic saving.

A conversion builds the n-stream model with its parameters on the meta device, *moves* the source
tensors into it (``load_state_dict(assign=True)``: the converted model shares storage with the source,
nothing is copied), then materialises and initialises only the new hyper-connection parameters
function-preservingly (SPEC §3). Peak memory is therefore about one copy of the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.configuration_hyper_connection import HyperConnectionConfig
from ..outputs import staged_directory

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The fields a user may pass as ``**mixer_options``; num_streams and mixer are explicit arguments.
HYPER_CONNECTION_OPTIONS = tuple(f.name for f in dataclasses.fields(HyperConnectionConfig) if f.name not in ("num_streams", "mixer"))


def check_mixer_options(options: dict) -> dict:
    """Return ``options`` if every key is a ``HyperConnectionConfig`` field, else raise ValueError naming them."""
    unknown = sorted(set(options) - set(HYPER_CONNECTION_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown hyper-connection option(s) {', '.join(unknown)}; allowed: {', '.join(HYPER_CONNECTION_OPTIONS)}"
        )
    return options


def hyper_connection_fields(num_streams: int, mixer: str, mixer_options: dict) -> dict:
    """The ``HyperConnectionConfig`` keyword arguments of a converted model's config."""
    return {"num_streams": num_streams, "mixer": mixer, **check_mixer_options(mixer_options)}


# ----------------------------------------------------------------------------------------------------------------
# Command line


def add_hyper_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--streams``, ``--mixer`` and one ``--option-name`` per ``HyperConnectionConfig`` field.

    Options left out keep the config's default (argparse.SUPPRESS), so the defaults live only in
    ``HyperConnectionConfig``; invalid values are rejected by the config's own validation.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(HyperConnectionConfig)}
    parser.add_argument("--streams", dest="num_streams", type=int, default=defaults["num_streams"], metavar="N",
                        help="number of residual streams n (default: %(default)s)")  # fmt: skip
    parser.add_argument("--mixer", default=defaults["mixer"],
                        help="residual mixer: stiefel, sinkhorn, grassmann, ... or a paper alias (default: %(default)s)")  # fmt: skip
    group = parser.add_argument_group("hyper-connection options (HyperConnectionConfig fields; default: the config's)")
    for name in HYPER_CONNECTION_OPTIONS:
        flag, default = "--" + name.replace("_", "-"), defaults[name]
        if isinstance(default, bool):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            kind = int if default is None else type(default)  # the only None default is grassmann_rank: int | None
            group.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper())


def hyper_connection_options(args: argparse.Namespace) -> dict:
    """The ``**mixer_options`` given on the command line (only those the user set)."""
    return {name: getattr(args, name) for name in HYPER_CONNECTION_OPTIONS if hasattr(args, name)}


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", help="Hub name recorded as base_model in the model card (default: SRC)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


# ----------------------------------------------------------------------------------------------------------------
# Weight transfer


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm progress bar over the layers of a conversion."""
    return iter(tqdm(iterable, desc=desc, total=total, unit="layer"))


def build_empty(model_class: Callable[..., nn.Module], config) -> nn.Module:
    """``model_class(config)`` (a class or a factory) with every parameter on the meta device (no memory); buffers stay real,
    so the non-persistent ones computed in ``__init__`` (rotary frequencies, mixer bases) are kept."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return model_class(config)


def move_weights(target: nn.Module, source: nn.Module | dict[str, torch.Tensor], *, new: tuple[str, ...] = ()) -> None:
    """Assign the source tensors to ``target`` in place of its meta parameters (no copy).

    Every target parameter must come from the source except those whose name contains one of ``new``
    (the hyper-connection parameters); every source tensor must find a place in the target.
    """
    state = source.state_dict() if isinstance(source, nn.Module) else source
    result = target.load_state_dict(state, strict=False, assign=True)
    unexpected = list(result.unexpected_keys)
    missing = [key for key in result.missing_keys if not any(part in key for part in new)]
    if unexpected or missing:
        raise RuntimeError(f"weights do not map: unexpected in the source {unexpected}, missing from it {missing}")


def materialize_new_parameters(model: nn.Module, device: torch.device | str = "cpu") -> list[str]:
    """Give every module that still has meta parameters real storage on ``device`` (in the dtype it was
    built with: float32) and initialise it with the model's own ``_init_weights`` (function-preserving for
    the hyper-connections). Returns the names of the modules initialised; raises if a meta tensor is left."""
    initialised = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if any(p.is_meta for p in own):
            if not all(p.is_meta for p in own):  # to_empty would wipe the moved weights
                raise RuntimeError(f"module {name!r} mixes moved and new parameters; assign the new ones explicitly")
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)
            initialised.append(name)
    leftover = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device after conversion: {leftover}")
    return initialised


# ----------------------------------------------------------------------------------------------------------------
# Saving


def load_preprocessor(source: str | Path, auto_class_name: str):
    """The tokenizer / image processor of a source checkpoint (``auto_class_name`` e.g. "AutoTokenizer"),
    or None with a warning when the source has none."""
    import transformers

    try:
        return getattr(transformers, auto_class_name).from_pretrained(source)
    except (OSError, ValueError) as error:
        logger.warning("no %s found for %s, saving the model without one: %s", auto_class_name, source, error)
        return None


def save_converted(model, save_directory: str | Path, *, base_model: str | None = None, preprocessor=None,
                   overwrite: bool = False) -> Path:  # fmt: skip
    """Save a converted model atomically (``hf_jpmhc.outputs.staged_directory``): weights, config, generation
    config, the tokenizer or image processor (if given) and a model card with ``base_model``."""
    from ..model_card import save_pretrained_with_card

    with staged_directory(save_directory, overwrite=overwrite) as staging:
        save_pretrained_with_card(model, staging, base_model=base_model)
        if preprocessor is not None:
            preprocessor.save_pretrained(staging)
    return Path(save_directory)
