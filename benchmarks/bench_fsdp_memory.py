"""Benchmark 6: peak memory per process of a training step, FSDP2 against DDP, 2 CPU processes (gloo).

Benchmark 1's model shape (≈23M-parameter Llama: hidden 512, 6 layers, vocab 4096) as a plain Llama and as JPmHC
n = 4 (stiefel), global batch 8 × 256 tokens split over the processes, AdamW, float32 — each launched with
``accelerate launch`` and the training scripts' setup (``training.common``: ``build_accelerator``,
``prepare_fsdp_units``, ``build_optimizer``) under ``training/configs/ddp_cpu.yaml`` and
``training/configs/fsdp_cpu.yaml``.

Each process runs under ``torch.profiler`` with ``profile_memory`` from before its model is built: the allocator's
running total in the profiler's allocation records then counts every tensor the process holds — parameters,
gradients, AdamW moments, DDP's buckets or FSDP's gathered layers, activations. After a warm-up step (AdamW
creates its moments) one step is marked; "peak" is the largest total during it. "state" is what the process keeps
between steps: its parameters (FSDP: its shards), gradients and AdamW moments. The table shows the larger of the
two processes and the FSDP / DDP ratio.

    python benchmarks/bench_fsdp_memory.py [--models llama jpmhc]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# kind → (launch config, the distributed type Accelerate must report under it)
CONFIGS = {"DDP": (REPO / "training/configs/ddp_cpu.yaml", "MULTI_CPU"),
           "FSDP": (REPO / "training/configs/fsdp_cpu.yaml", "FSDP")}  # fmt: skip


def tensor_bytes(tensors) -> int:
    """Bytes of ``tensors`` as held by this process (a DTensor: its local shard)."""
    from torch.distributed.tensor import DTensor

    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


MEASURED = "measured step"


def peak_allocated_bytes(prof) -> int:
    """The most bytes the CPU allocator held at once during the ``MEASURED`` region of profile ``prof``."""
    from torch._C._profiler import _EventType

    nodes, allocations, window = list(prof.profiler.kineto_results.experimental_event_tree()), [], None
    while nodes:
        node = nodes.pop()
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.total_allocated))
        elif node.name == MEASURED:
            window = (node.start_time_ns, node.end_time_ns)
        nodes.extend(node.children)
    return max(total for time, total in allocations if window[0] <= time <= window[1])


def worker(model_name: str, output: Path) -> None:
    """One process of a launch: the model and a warm-up step, then a measured step, profiled from the start; the
    figures written as ``output``.RANK.json."""
    sys.path.insert(0, str(REPO))
    from bench_train_step import BATCH, batch, jpmhc, llama
    from torch.profiler import ProfilerActivity, profile, record_function

    from training.common import build_accelerator, build_optimizer, prepare_fsdp_units

    accelerator = build_accelerator(tempfile.mkdtemp(prefix="bench_fsdp_memory_"))
    share = BATCH // accelerator.num_processes  # the global batch, split
    ids = batch()[accelerator.process_index * share : (accelerator.process_index + 1) * share]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = prepare_fsdp_units(accelerator, llama() if model_name == "llama" else jpmhc("stiefel"))
        optimizer = build_optimizer(model, learning_rate=1e-4)
        model, optimizer = accelerator.prepare(model, optimizer)

        def step() -> None:
            optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated between steps, as state
            accelerator.backward(model(input_ids=ids, labels=ids).loss)
            optimizer.step()

        step()
        with record_function(MEASURED):
            step()
    params = list(model.parameters())
    moments = [t for s in optimizer.optimizer.state.values() for t in s.values() if t.dim() > 0]
    figures = {"peak": peak_allocated_bytes(prof), "distributed_type": accelerator.distributed_type.value,
               "state": tensor_bytes(params) + tensor_bytes(p.grad for p in params) + tensor_bytes(moments)}  # fmt: skip
    Path(f"{output}.{accelerator.process_index}.json").write_text(json.dumps(figures))


def launch(config: Path, model_name: str, output: Path) -> list[dict]:
    """``accelerate launch --config_file config`` of this file as a worker; the figures of each process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
               str(port), __file__, "--worker", model_name, "--output", str(output)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{config.name} {model_name} failed:\n{result.stderr[-3000:]}")
    return [json.loads(path.read_text()) for path in sorted(output.parent.glob(f"{output.name}.*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama", "jpmhc"], choices=["llama", "jpmhc"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.output)
        return
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for model_name in args.models:
            for kind, (config, distributed_type) in CONFIGS.items():
                print(f"{model_name} under {kind} ...", flush=True)
                processes = launch(config, model_name, Path(scratch) / f"{model_name}-{kind}")
                if {p["distributed_type"] for p in processes} != {distributed_type}:
                    raise SystemExit(f"{config.name} ran as {processes[0]['distributed_type']}, not {distributed_type}")
                results.setdefault(model_name, {})[kind] = processes
    mib = 2**20
    print("\npeak memory per process of a training step (fwd + bwd + AdamW), benchmark 1's shape, global batch 8 × 256,")
    print("2 CPU processes; the larger process of each launch; state = parameters + gradients + AdamW moments held\n")
    print(f"{'model':<22} {'DDP peak MiB':>13} {'FSDP peak MiB':>14} {'FSDP/DDP':>9}   "
          f"{'DDP state MiB':>14} {'FSDP state MiB':>15} {'FSDP/DDP':>9}")  # fmt: skip
    for model_name, by_kind in results.items():
        peak = {kind: max(p["peak"] for p in processes) for kind, processes in by_kind.items()}
        state = {kind: max(p["state"] for p in processes) for kind, processes in by_kind.items()}
        name = "llama" if model_name == "llama" else "jpmhc n=4 stiefel"
        print(f"{name:<22} {peak['DDP'] / mib:>13.1f} {peak['FSDP'] / mib:>14.1f} {peak['FSDP'] / peak['DDP']:>8.3f}×   "
              f"{state['DDP'] / mib:>14.1f} {state['FSDP'] / mib:>15.1f} {state['FSDP'] / state['DDP']:>8.3f}×")  # fmt: skip


if __name__ == "__main__":
    main()
