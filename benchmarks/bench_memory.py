"""Benchmark 3: bytes saved for the backward per training step (``torch.autograd.graph.saved_tensors_hooks``).

Every tensor autograd saves during forward + loss is recorded by its storage (each storage counted once, so
views and tensors saved twice are not double-counted; parameters count in both models alike). A second,
independent column: the bytes still allocated when the forward returns (``torch.profiler`` with
``profile_memory=True``: activations kept for the backward, logits and loss; no parameters) — a check that no
saved-tensor hook (``hc_recompute``'s rebuild) hides memory from the first count.
Rows: Llama; JPmHC n = 4 with and without ``hc_recompute``; Sinkhorn implicit backward at
``sinkhorn_iters`` = 1 and 20 (and unrolled as the control). Same shape as benchmark 1.
Targets: JPmHC with recompute ≤ 1.25× Llama; implicit Sinkhorn iters=20 / iters=1 ≤ 1.05×.

    python benchmarks/bench_memory.py
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from bench_train_step import BATCH, SEQ, batch, jpmhc, llama


def saved_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd saves in one training forward (loss included)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = batch()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids).loss.detach()
    return sum(storages.values())


def allocated_after_forward(model: torch.nn.Module) -> int:
    """Net bytes the CPU allocator hands out during one training forward and that are still held at its end."""
    ids = batch()
    model.train()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(input_ids=ids, labels=ids).loss  # holds the graph until the profile ends
    del loss
    return sum(event.self_cpu_memory_usage for event in prof.key_averages())


def main() -> None:
    rows = {
        "llama": llama,
        "jpmhc n=4 stiefel": lambda: jpmhc("stiefel"),
        "jpmhc n=4 stiefel, hc_recompute": lambda: jpmhc("stiefel", hc_recompute=True),
        "jpmhc n=4 sinkhorn, hc_recompute": lambda: jpmhc("sinkhorn", hc_recompute=True),
        "jpmhc n=4 kronecker, hc_recompute": lambda: jpmhc("kronecker", hc_recompute=True),
        "sinkhorn implicit, iters=1": lambda: jpmhc("sinkhorn", sinkhorn_iters=1),
        "sinkhorn implicit, iters=20": lambda: jpmhc("sinkhorn", sinkhorn_iters=20),
        "sinkhorn unrolled, iters=20": lambda: jpmhc("sinkhorn", sinkhorn_iters=20, sinkhorn_backward="unrolled"),
    }
    measured, allocated = {}, {}
    for name, build in tqdm(rows.items(), desc="models"):
        measured[name], allocated[name] = saved_bytes(build()), allocated_after_forward(build())
    print(f"\nsaved-for-backward bytes per training step, batch {BATCH}, seq {SEQ}")
    print(f"{'model':<38} {'saved MiB':>10} {'vs llama':>9} {'allocated MiB':>14} {'vs llama':>9}")
    for name, value in measured.items():
        print(f"{name:<38} {value / 2**20:>10.1f} {value / measured['llama']:>8.3f}× "
              f"{allocated[name] / 2**20:>14.1f} {allocated[name] / allocated['llama']:>8.3f}×")  # fmt: skip
    ratio = measured["sinkhorn implicit, iters=20"] / measured["sinkhorn implicit, iters=1"]
    print(f"\nimplicit Sinkhorn, iters=20 / iters=1: {ratio:.3f}×  (target ≤ 1.05×)")
    print("JPmHC with hc_recompute / llama: target ≤ 1.25×")


if __name__ == "__main__":
    main()
