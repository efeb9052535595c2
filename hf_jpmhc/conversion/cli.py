"""``hf-jpmhc convert {llama,vit} SRC OUT --streams 4 --mixer stiefel [hyper-connection options]``."""

from __future__ import annotations

import argparse

from .common import add_hyper_connection_arguments, add_output_arguments, hyper_connection_options

EXAMPLE = "example: hf-jpmhc convert llama HuggingFaceTB/SmolLM2-135M-Instruct smollm2-jpmhc --streams 4 --mixer stiefel"


def register(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser(
        "convert", help="convert a pretrained checkpoint to a function-preserving n-stream JPmHC model", epilog=EXAMPLE
    )
    sources = convert.add_subparsers(dest="source_architecture", required=True)
    for name, help_text, run in (
        ("llama", "a LlamaForCausalLM (or Mistral / Qwen2 that maps exactly) → JPmHCForCausalLM", _convert_llama),
        ("vit", "a ViTForImageClassification → JPmHCViTForImageClassification", _convert_vit),
    ):
        parser = sources.add_parser(name, help=help_text)
        parser.add_argument("src", metavar="SRC", help="source checkpoint: a local directory or a Hub name")
        parser.add_argument("out", metavar="OUT", help="directory to write the converted checkpoint to")
        add_hyper_connection_arguments(parser)
        add_output_arguments(parser)
        parser.set_defaults(func=run, prog=parser.prog)


def _convert_llama(args: argparse.Namespace) -> None:
    from .llama import convert_llama

    _convert(args, convert_llama, "AutoTokenizer")


def _convert_vit(args: argparse.Namespace) -> None:
    from .vit import convert_vit

    _convert(args, convert_vit, "AutoImageProcessor")


def _convert(args: argparse.Namespace, converter, preprocessor_class: str) -> None:
    from ..outputs import check_output
    from .common import load_preprocessor, save_converted

    check_output(args.out, args.overwrite)  # before the work
    model = converter(args.src, num_streams=args.num_streams, mixer=args.mixer, **hyper_connection_options(args))
    out = save_converted(
        model,
        args.out,
        base_model=args.base_model or args.src,
        preprocessor=load_preprocessor(args.src, preprocessor_class),
        overwrite=args.overwrite,
    )
    print(f"saved {type(model).__name__} (mixer={model.config.mixer}, n={model.config.num_streams}) to {out}")
