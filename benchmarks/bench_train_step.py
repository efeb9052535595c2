"""Benchmark 1: training-step time (forward + backward + AdamW) of JPmHC n = 4 against the plain Llama.

Same Llama shape (≈23M parameters: hidden 512, 6 layers, vocab 4096), sequence 256, batch 8, float32 on CPU.
The models run interleaved (one step of each per round) so that load on a shared machine hits all alike;
the table reports the median step time, its ratio to Llama, the median of the per-round (paired)
ratios and the ratio of the fastest steps. Target (issue 5): ≤ 1.10×.

JPmHC runs with each ``--backends`` entry: ``torch`` (eager) and ``compiled`` (the CPU training path: the
hyper-connections' per-token passes compiled by inductor, everything else eager; the warm-up step compiles).
``--compile`` instead compiles every whole model, Llama included; ``--autocast bf16`` runs every model's forward
under ``torch.autocast`` (CPU mixed precision: the branches in bf16, the hyper-connections in float32, master weights
float32; the backward outside it, as Accelerate and Trainer run it). Like the training scripts, the benchmark first
has glibc keep freed memory (``hf_jpmhc.ops.cpu.keep_freed_memory``: no page faults on buffers reallocated
every step), for every model alike; ``--default-malloc`` leaves glibc's defaults.

    python benchmarks/bench_train_step.py [--repeats 4] [--mixers stiefel sinkhorn kronecker]
        [--backends torch compiled] [--compile] [--autocast bf16] [--threads 1] [--default-malloc]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from hf_jpmhc import JPmHCConfig, JPmHCForCausalLM
from hf_jpmhc.ops.cpu import keep_freed_memory

LLAMA_SHAPE = dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
BATCH, SEQ = 8, 256
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPE))


def jpmhc(mixer: str, **options) -> JPmHCForCausalLM:
    torch.manual_seed(0)
    return JPmHCForCausalLM(JPmHCConfig(**LLAMA_SHAPE, num_streams=4, mixer=mixer, **options))


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, LLAMA_SHAPE["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def train_step_fn(model: torch.nn.Module, compile_model: bool = False, autocast: torch.dtype | None = None):
    """A closure running one forward (under CPU autocast to ``autocast`` if given) + backward + AdamW step on a fixed
    batch."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compile_model else model
    ids = batch()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()

    return step


def interleaved_times(steps: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of each closure over ``repeats`` rounds, running every closure once per round, in reverse order
    every other round (a model's place in the round moves its time: what runs before it leaves the caches and
    the heap in a different state). A closure that times only part of its work returns that time in seconds (a
    float), which is used instead."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in tqdm(range(repeats), desc="rounds"):
        for name in list(steps) if round_ % 2 == 0 else reversed(list(steps)):
            start = time.perf_counter()
            seconds = steps[name]()
            times[name].append(seconds if isinstance(seconds, float) else time.perf_counter() - start)
    return times


def print_table(title: str, times: dict[str, list[float]], baseline: str, target: str = "") -> None:
    """Median time, the ratio of medians to ``baseline``, the median of the per-round ratios with their range, and
    the ratio of the fastest times. Each round runs every model back to back, so a round's ratio is a paired
    measurement: its median is the figure least moved by load that comes and goes, and its spread shows the
    noise. The fastest time of each model is its least disturbed one (what ``timeit`` reports)."""
    base = times[baseline]
    print(f"\n{title}")
    print(f"{'model':<34} {'median s':>10} {'ratio':>8} {'paired':>8} {'fastest':>8}   {'per-round ratios (min–max)':>26}")
    for name, ts in times.items():
        rounds = [t / b for t, b in zip(ts, base, strict=True)]
        ratio, fastest = statistics.median(ts) / statistics.median(base), min(ts) / min(base)
        print(f"{name:<34} {statistics.median(ts):>10.4f} {ratio:>7.3f}× {statistics.median(rounds):>7.3f}× "
              f"{fastest:>7.3f}×   {min(rounds):>12.3f} – {max(rounds):.3f}")  # fmt: skip
    if target:
        print(target)


def parse_process_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Adds the process settings every model of a run shares (``--threads``, ``--default-malloc``), parses the
    command line and applies them; ``args.process`` describes them for the table's title."""
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads; 1 avoids OpenMP barrier stalls on an oversubscribed machine")  # fmt: skip
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is instead of calling keep_freed_memory()")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = not args.default_malloc and keep_freed_memory()
    args.process = f"{torch.get_num_threads()} threads, keep_freed_memory={kept}"
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--mixers", nargs="+", default=["stiefel", "sinkhorn", "kronecker"])
    parser.add_argument("--backends", nargs="+", default=["torch", "compiled"], help="JPmHC kernel_backend values")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (same for Llama)")
    parser.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), help="every model's forward under CPU autocast")
    args = parse_process_args(parser)
    autocast = AUTOCAST_DTYPES.get(args.autocast)
    steps = {"llama": train_step_fn(llama(), args.compile, autocast)}
    for mixer in args.mixers:
        for backend in args.backends:
            model = jpmhc(mixer, kernel_backend=backend)
            steps[f"jpmhc n=4 {mixer} {backend}"] = train_step_fn(model, args.compile, autocast)
    n_params = sum(p.numel() for p in llama().parameters())
    times = interleaved_times(steps, args.repeats)
    print_table(f"train step (fwd+bwd+AdamW), {n_params / 1e6:.1f}M-param Llama shape, batch {BATCH}, seq {SEQ}, "
                f"{args.process}, compile={args.compile}, autocast={args.autocast}, {args.repeats} interleaved rounds",
                times, "llama", target="target: ratio ≤ 1.10×")  # fmt: skip


if __name__ == "__main__":
    main()
