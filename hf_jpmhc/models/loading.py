"""Strict ``from_pretrained``: a JPmHC checkpoint whose weights do not fit its config is an error, not a warning.

transformers initialises every weight a checkpoint lacks (and, with ``ignore_mismatched_sizes``, every weight
of another shape), logs a report and carries on. For a JPmHC checkpoint that is a model silently computing
something else: with ``num_streams`` edited in config.json every hyper-connection gets a new Φ and bias, with
a layer added the new layer is random. ``StrictLoadingMixin`` checks what the checkpoint provided before
transformers initialises the rest, and raises ``CheckpointMismatchError`` naming the weights.

What still loads, as in transformers: tied weights (one of the pair in the file is enough), the keys a model
declares ignorable (``_keys_to_ignore_on_load_*``, old ``rotary_emb.inv_freq``), non-persistent buffers (the
mixers' constant bases: not in any state dict), and, when the checkpoint was saved from another class, a whole
module that one of the two classes lacks (``AutoModelForSequenceClassification.from_pretrained(causal_lm_dir)``:
the new ``score`` head starts at its initialisation, ``lm_head`` is dropped). Every module both have must load
completely.

Part of the remote code: imports only transformers.
"""

import dataclasses

from transformers.utils.loading_report import update_key_name

# Names shown per kind of problem in the error message (the rest are counted).
SHOWN_KEYS = 3


class CheckpointMismatchError(ValueError):
    """A checkpoint's weights do not fit the model its config describes."""


def _tie_partners(key: str, tied: dict[str, str]) -> set[str]:
    """The keys ``key`` is tied to (``tied`` maps target → source)."""
    return {tied[key]} if key in tied else {target for target, source in tied.items() if source == key}


def _module_of(model, key: str) -> str:
    """The top-level module a weight belongs to, in either class's naming: ``model.layers.2.mlp.up_proj.weight``
    and ``layers.2.mlp.up_proj.weight`` → ``layers``; ``lm_head.weight`` → ``lm_head``; ``vit.pooler.dense.bias`` → ``pooler``."""
    parts = key.split(".")
    return parts[1] if parts[0] == model.base_model_prefix and len(parts) > 1 else parts[0]


def _listed(keys: set[str] | dict[str, str]) -> str:
    """Up to ``SHOWN_KEYS`` names with layer indices merged (``model.layers.{0, 1}.attn_hc.phi``), each followed
    by its detail when ``keys`` maps names to details; the rest are counted."""
    details = keys if isinstance(keys, dict) else dict.fromkeys(keys, "")
    names = [name + detail for name, detail in update_key_name(dict(sorted(details.items()))).items()]
    more = f", … ({len(keys)} in all)" if len(names) > SHOWN_KEYS else ""
    return ", ".join(names[:SHOWN_KEYS]) + more


def forgiven_keys_removed(model, loading_info) -> tuple[set[str], set[str]]:
    """(missing, unexpected) keys of transformers' ``LoadStateDictInfo`` as the weights were read, with what
    ``from_pretrained`` later forgives applied to a copy: tied weights present once, keys the model ignores."""
    tied = model.all_tied_weights_keys
    missing = {key for key in loading_info.missing_keys
               if not any(partner not in loading_info.missing_keys for partner in _tie_partners(key, tied))}  # fmt: skip
    adjusted = dataclasses.replace(loading_info, missing_keys=missing, unexpected_keys=set(loading_info.unexpected_keys))
    model._adjust_missing_and_unexpected_keys(adjusted)
    return adjusted.missing_keys, adjusted.unexpected_keys


def mismatch_error(model, source, missing, unexpected, mismatched) -> CheckpointMismatchError | None:
    """The error for a checkpoint (``source``) that did not provide ``model``'s weights, or None if it fits.

    ``mismatched`` holds (key, shape in the file, shape in the model). Every module that the model and the
    checkpoint share must load completely; a module one of them lacks entirely (a task head, ViT's pooler) may
    come or go only when the checkpoint was saved from another class.
    """
    if type(model).__name__ not in (model.config.architectures or []):  # a task switch
        expected = model.state_dict().keys()
        modules = {_module_of(model, key) for key in expected}
        loaded = {_module_of(model, key) for key in expected if key not in missing}
        missing = {key for key in missing if _module_of(model, key) in loaded}
        unexpected = {key for key in unexpected if _module_of(model, key) in modules}
    problems = []
    if missing:
        problems.append(f"missing {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listed(unexpected)}")
    if mismatched:
        shapes = {key: f" (file {tuple(file)}, config {tuple(config)})" for key, file, config in mismatched}
        problems.append(f"of another shape {_listed(shapes)}")
    if not problems:
        return None
    return CheckpointMismatchError(
        f"{source}: the weights do not match config.json ({'; '.join(problems)}); load it with the config.json "
        "saved with these weights (was num_streams, mixer or a layer count edited?)"
    )


class StrictLoadingMixin:
    """Makes ``from_pretrained`` raise ``CheckpointMismatchError`` instead of initialising absent weights.

    The hook is ``_finalize_model_loading``, which transformers calls with the loading report right after
    reading the weights and before it ties, initialises and logs; mix this class in before ``PreTrainedModel``.
    ``ignore_mismatched_sizes=True`` keeps its transformers meaning: weights of another shape are re-initialised.
    """

    @classmethod
    def _finalize_model_loading(cls, model, load_config, loading_info):
        missing, unexpected = forgiven_keys_removed(model, loading_info)
        mismatched = () if load_config.ignore_mismatched_sizes else loading_info.mismatched_keys
        error = mismatch_error(model, load_config.pretrained_model_name_or_path, missing, unexpected, mismatched)
        if error is not None:
            raise error
        return super()._finalize_model_loading(model, load_config, loading_info)
