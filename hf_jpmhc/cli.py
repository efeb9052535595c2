"""``hf-jpmhc``: one command, one sub-command per area (convert, spectrum, gain, ...).

Each area module exposes ``register(subparsers)``, which adds its sub-command and sets ``func`` and ``prog``
(the sub-command's name in error messages); modules are imported only when the CLI starts, and should import
heavy dependencies inside ``func``. Bad input exits with status 2 and one line (``hf_jpmhc.errors``).
"""

from __future__ import annotations

import argparse
import importlib

from .errors import user_errors

COMMAND_MODULES = (
    "hf_jpmhc.conversion.cli",
    "hf_jpmhc.diagnostics.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-jpmhc", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with user_errors(args.prog):
        args.func(args)


if __name__ == "__main__":
    main()
