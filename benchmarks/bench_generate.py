"""Benchmark 5: greedy generation with the KV cache, JPmHC n = 4 against Llama (benchmark 1's shape).

Batch 1, a 32-token prompt, 64 new tokens, ``do_sample=False``; rounds interleave the models; medians.
Attention only ever sees the collapsed stream, so the caches are the Llama's; the extra cost is the
per-token hyper-connection work. Target: ratio ≤ 1.15×.

``--compile``: every model decodes with transformers' own compiled path — a static KV cache, whose
``generate`` compiles the decoding forward (``CompileConfig``; on CPU it must be allowed explicitly). The
first round, excluded from the medians, includes compilation (≈ 0.5–2 min per model on one core).

``--perturb``: the hyper-connection weights are moved off their initialisation (Φ + N(0, 0.02²), b and α +
N(0, 0.3²)), as training moves them, so that every mixer works away from its identity logits (at initialisation
Sinkhorn's first round is already doubly stochastic and its polish stops at once).

    python benchmarks/bench_generate.py [--repeats 5] [--new-tokens 64] [--threads 1] [--compile] [--perturb]
        [--mixers …] [--backends …]
"""

from __future__ import annotations

import argparse

import torch
from transformers import CompileConfig

from hf_jpmhc.models.hyper_connection import is_hyper_connection_parameter

from bench_train_step import interleaved_times, jpmhc, llama, parse_process_args, print_table


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if is_hyper_connection_parameter(name):
                scale = 0.02 if parameter.ndim == 2 else 0.3
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def generate_fn(model: torch.nn.Module, new_tokens: int, compile_model: bool = False):
    model.eval()
    prompt = torch.randint(3, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    options = {}
    if compile_model:
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers auto-compiles on accelerators only by default
        model.generation_config.compile_config = compile_config
        options["cache_implementation"] = "static"  # the cache generate() compiles for

    @torch.inference_mode()
    def run() -> None:
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=0, **options)  # fmt: skip
        assert out.shape[1] == prompt.shape[1] + new_tokens

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="static cache + compiled decoding, every model alike")
    parser.add_argument("--perturb", action="store_true", help="hyper-connection weights moved off their init")
    parser.add_argument("--mixers", nargs="+", default=["stiefel", "sinkhorn", "kronecker"])
    parser.add_argument("--backends", nargs="+", default=["torch", "compiled"], help="JPmHC kernel_backend values")
    args = parse_process_args(parser)
    runs = {"llama": generate_fn(llama(), args.new_tokens, args.compile)}
    for mixer in args.mixers:
        for backend in args.backends:
            model = jpmhc(mixer, kernel_backend=backend)
            runs[f"jpmhc n=4 {mixer} {backend}"] = generate_fn(perturb(model) if args.perturb else model,
                                                               args.new_tokens, args.compile)  # fmt: skip
    times = interleaved_times(runs, args.repeats)
    print_table(f"greedy generation, KV cache, batch 1, prompt 32, {args.new_tokens} new tokens, "
                f"{args.process}, compile={args.compile}, perturbed={args.perturb}, {args.repeats} interleaved rounds",
                times, "llama",
                target="target: ratio ≤ 1.15×")  # fmt: skip


if __name__ == "__main__":
    main()
