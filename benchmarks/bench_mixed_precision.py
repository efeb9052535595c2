"""Benchmark 6: bf16 mixed-precision training through each route, against the same run in float32 (issue 20).

Routes: ``training/pretrain.py --mixed_precision bf16``; ``accelerate launch --mixed_precision bf16`` of the same
script (one process, no precision flag for the script); ``transformers.Trainer(bf16=True, use_cpu=True)``; TRL's
``SFTTrainer`` with a LoRA config (the hyper-connections in ``modules_to_save``). One model for all: a preset
(``--model``; ``jpmhc-tiny``: hidden 128, 4 layers, n = 4, stiefel) with the byte-level tokenizer, on offline Shakespeare
blocks of 128 tokens, batch 8, AdamW at lr 1e-3 (5 warmup steps, cosine), ``--steps`` updates, one intra-op thread.
Per route and precision: the training loss at the last step (the same batches in both precisions) and the median
step time (update to update, the first 3 excluded); each route's float32 and bf16 runs alternate ``--repeats`` times.
The scripts run as subprocesses (``OMP_NUM_THREADS=1``; step time from their logged tokens/s), the trainers in
this process (step time from an optimizer-step hook).

    python benchmarks/bench_mixed_precision.py [--steps 30] [--repeats 2] [--model jpmhc-tiny] [--kernel_backend torch]
        [--routes pretrain accelerate trainer sft]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_jpmhc import JPmHCForCausalLM  # noqa: E402
from hf_jpmhc.data.text import build_lm_datasets, byte_tokenizer  # noqa: E402
from training import pretrain  # noqa: E402

BLOCK, BATCH, LEARNING_RATE, WARMUP, SKIPPED_STEPS = 128, 8, 1e-3, 5, 3
PRECISIONS = ("no", "bf16")


def script_args(output_dir: str, steps: int, model: str, kernel_backend: str) -> list[str]:
    return [f"--output_dir={output_dir}", f"--model={model}", "--tokenizer=byte", f"--block_size={BLOCK}",
            f"--batch_size={BATCH}", f"--max_steps={steps}", f"--warmup_steps={WARMUP}",
            f"--learning_rate={LEARNING_RATE}", f"--kernel_backend={kernel_backend}", "--log_every=1",
            "--eval_every=0", "--eval_blocks=8", "--save_every=0"]  # fmt: skip


def run_script(route: str, precision: str, steps: int, model: str, kernel_backend: str) -> tuple[float, list[float]]:
    """(last loss, step times) of training/pretrain.py run directly or through ``accelerate launch``."""
    with tempfile.TemporaryDirectory() as output_dir:
        args = script_args(output_dir, steps, model, kernel_backend)
        if route == "pretrain":
            cmd = [sys.executable, "training/pretrain.py", *args, f"--mixed_precision={precision}"]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes=1", "--num_machines=1",
                   f"--mixed_precision={precision}", "--dynamo_backend=no", "training/pretrain.py", *args]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
        records = [json.loads(line) for line in (Path(output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    return losses[-1], [BLOCK * BATCH / r["items_per_s"] for r in records if "items_per_s" in r]


def run_trainer(route: str, precision: str, steps: int, preset: str, kernel_backend: str) -> tuple[float, list[float]]:
    """(last loss, step times) of transformers' Trainer or TRL's SFTTrainer in this process."""
    from transformers import Trainer, TrainingArguments

    tokenizer = byte_tokenizer()
    config = pretrain.model_config_from(pretrain.parse_config([f"--model={preset}", f"--kernel_backend={kernel_backend}"]),
                                        len(tokenizer), tokenizer)  # fmt: skip
    torch.manual_seed(0)
    model = JPmHCForCausalLM(config)
    train = build_lm_datasets("shakespeare", tokenizer, BLOCK, seed=0)["train"]
    settings = dict(bf16=precision == "bf16", use_cpu=True, max_steps=steps, per_device_train_batch_size=BATCH,
                    learning_rate=LEARNING_RATE, warmup_steps=WARMUP, lr_scheduler_type="cosine", weight_decay=0.1,
                    adam_beta2=0.95, logging_steps=1, report_to="none", save_strategy="no", seed=0,
                    dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
    stamps: list[float] = []
    hook = register_optimizer_step_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    with tempfile.TemporaryDirectory() as output_dir:
        if route == "trainer":
            trainer = Trainer(model=model, args=TrainingArguments(output_dir, **settings),
                              train_dataset=train.map(lambda row: {"labels": row["input_ids"]}))  # fmt: skip
        else:
            from peft import LoraConfig
            from trl import SFTConfig, SFTTrainer

            from hf_jpmhc.peft_utils import LLAMA_LORA_TARGETS, hyper_connection_module_names

            lora = LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_LORA_TARGETS),
                              modules_to_save=hyper_connection_module_names(model))  # fmt: skip
            trainer = SFTTrainer(model=model, args=SFTConfig(output_dir, max_length=BLOCK, **settings),
                                 train_dataset=train, processing_class=tokenizer, peft_config=lora)  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):  # the trainers print every log record
            trainer.train()
    hook.remove()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return losses[-1], [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="jpmhc-tiny", help="a preset of training/configs/presets")
    parser.add_argument("--kernel_backend", default="torch", choices=["torch", "compiled"])
    parser.add_argument("--routes", nargs="+", default=["pretrain", "accelerate", "trainer", "sft"],
                        choices=["pretrain", "accelerate", "trainer", "sft"])  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{args.model}, byte vocabulary, batch {BATCH} × {BLOCK} tokens, {args.steps} steps, "
          f"kernel_backend={args.kernel_backend}, 1 thread, {args.repeats} alternating repeats")  # fmt: skip
    print(f"{'route':<12} {'loss fp32':>10} {'loss bf16':>10} {'|Δ|':>8} {'step fp32 s':>12} {'step bf16 s':>12} "
          f"{'bf16/fp32':>10}   per-repeat ratios")  # fmt: skip
    for route in args.routes:
        run = run_script if route in ("pretrain", "accelerate") else run_trainer
        losses, medians = {}, {p: [] for p in PRECISIONS}
        for _ in range(args.repeats):
            for precision in PRECISIONS:
                losses[precision], times = run(route, precision, args.steps, args.model, args.kernel_backend)
                medians[precision].append(statistics.median(times[SKIPPED_STEPS:]))
        ratios = [b / a for a, b in zip(medians["no"], medians["bf16"])]
        fp32, bf16 = statistics.median(medians["no"]), statistics.median(medians["bf16"])
        print(f"{route:<12} {losses['no']:>10.4f} {losses['bf16']:>10.4f} {abs(losses['bf16'] - losses['no']):>8.4f} "
              f"{fp32:>12.4f} {bf16:>12.4f} {bf16 / fp32:>9.3f}×   {', '.join(f'{r:.3f}' for r in ratios)}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
