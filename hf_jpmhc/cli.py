"""``hf-jpmhc``: one command, one sub-command per area (convert, spectrum, gain, ...).

Each area module exposes ``register(subparsers)``, which adds its sub-command and sets ``func``; modules
are imported only when the CLI starts, and should import heavy dependencies inside ``func``.
"""

from __future__ import annotations

import argparse
import importlib

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
    args.func(args)


if __name__ == "__main__":
    main()
