"""Benchmark 4: effective memory bandwidth of the stream update X' = Hᵀ X + post ⊗ f on CPU.

Rows: the eager torch reference, hf_jpmhc's C++ loop (what ``kernel_backend="compiled"`` trains with) and
``torch.compile`` of the reference (inductor's loop). Bytes moved per call, float32: read X (n·C) and f (C), write X' (n·C) per token — (2n+1)·C·4 bytes (H and
post are n² + n floats, counted too). The reference is ``dst.copy_(src)`` of a tensor of half those bytes
(a copy reads and writes it: the same traffic). Interleaved repeats, medians. Target: ratio ≥ 0.7.

    python benchmarks/bench_stream_update.py [--repeats 30] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_jpmhc.models.stream_passes import update_streams
from hf_jpmhc.ops import cpu

B, T, N, C = 8, 256, 4, 512  # one site of benchmark 1's model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd row")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    streams, branch = torch.randn(B, T, N, C), torch.randn(B, T, C)
    mixer, post = torch.randn(B, T, N, N), torch.rand(B, T, N)
    moved = 4 * (streams.numel() * 2 + branch.numel() + mixer.numel() + post.numel())
    src = torch.randn(moved // 8)  # copy_: reads and writes moved / 2 bytes
    dst = torch.empty_like(src)
    if cpu.NativePasses.update_streams(streams, mixer, post, branch) is None:  # else the row would time a no-op
        raise SystemExit("hf_jpmhc's C++ CPU kernels did not build (see the warning above)")
    calls = {
        "tensor copy (same bytes)": lambda: dst.copy_(src),
        "update_streams (eager)": lambda: update_streams(streams, mixer, post, branch),
        "C++ loop (kernel_backend=compiled)": lambda: cpu.NativePasses.update_streams(streams, mixer, post, branch),
    }
    if not args.no_compile:
        compiled = torch.compile(update_streams, fullgraph=True)
        calls["update_streams (torch.compile)"] = lambda: compiled(streams, mixer, post, branch)
    for call in calls.values():
        call(), call()
    times = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    copy_bw = moved / medians["tensor copy (same bytes)"]
    print(f"\nstream update bandwidth, B={B} T={T} n={N} C={C}, {moved / 2**20:.1f} MiB moved per call, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats")  # fmt: skip
    print(f"{'op':<36} {'median ms':>10} {'GB/s':>8} {'vs copy':>8}")
    for name, seconds in medians.items():
        bandwidth = moved / seconds
        print(f"{name:<36} {seconds * 1e3:>10.3f} {bandwidth / 1e9:>8.2f} {bandwidth / copy_bw:>8.3f}")
    print("target: update bandwidth / copy bandwidth ≥ 0.7")


if __name__ == "__main__":
    main()
