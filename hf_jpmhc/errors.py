"""Bad input at an entry point: one line saying what is wrong and what to do, exit status 2, no traceback.

argparse already answers its own errors so (``prog: error: <message>``, exit status 2); ``user_errors`` does the
same for everything a command finds wrong after parsing. Every entry point runs inside it:

    hf-jpmhc convert | gain | spectrum       hf_jpmhc/cli.py
    python -m eval.run, python -m eval.prepare
    training/pretrain.py, training/finetune_vision.py

The user's errors are the exceptions raised for what they passed: ``ValueError`` (the checks of this package and
of the configs, ``CheckpointMismatchError``, huggingface_hub's ``HFValidationError``), ``OSError`` (paths that
do not exist or cannot be written, transformers' "not a model" errors, the Hub's network errors, eval's
``DataUnavailableError``), safetensors' ``SafetensorError`` and YAML syntax errors. ``describe`` words each as one
line, adding what to do where the library's message does not say it. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

from .loading import OFFLINE_HINT


def _user_error_types() -> tuple[type[BaseException], ...]:
    import yaml
    from safetensors import SafetensorError

    return ValueError, OSError, SafetensorError, yaml.YAMLError


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _chain(error: BaseException):
    """``error`` and the exceptions it was raised from (transformers re-raises the Hub's errors as OSError)."""
    while error is not None:
        yield error
        error = error.__cause__


def describe(error: BaseException) -> str | None:
    """The one-line message for a user error, or None if ``error`` is a bug."""
    from huggingface_hub import is_offline_mode
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    from safetensors import SafetensorError

    if not isinstance(error, _user_error_types()):
        return None
    message = _one_line(error)
    if isinstance(error, ValueError):  # raised for the user: the message already says what to do
        return message
    if isinstance(error, SafetensorError):
        return f"a .safetensors weight file is unreadable ({message}): it is truncated or corrupt; save or download it again"
    causes = list(_chain(error))
    if any(isinstance(cause, (ConnectionError, LocalEntryNotFoundError)) for cause in causes):  # incl. OfflineModeIsEnabled
        state = "offline (HF_HUB_OFFLINE=1)" if is_offline_mode() else "unreachable"
        first_line = str(error).splitlines()[0]
        return f"{first_line} — the Hugging Face Hub is {state} and the local cache has no copy; {OFFLINE_HINT}"
    if any(isinstance(cause, RepositoryNotFoundError) for cause in causes):
        return f"{str(error).splitlines()[0]}; check the path or the Hub name"
    if isinstance(error, PermissionError) and error.filename:
        return f"{error.strerror}: {error.filename}; choose a location you can write to, or change its permissions"
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) and error.filename:
        return f"{error.strerror}: {error.filename}; check the path"
    return message


@contextmanager
def user_errors(prog: str):
    """Run a command's body: a user error (``describe``) prints ``prog: error: <message>`` on stderr and exits
    with status 2, as argparse does; other exceptions propagate with their traceback. Also a decorator."""
    try:
        yield
    except Exception as error:
        message = describe(error)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
