"""Pretrain a JPmHC causal LM with 🤗 Accelerate — offline by default, resumable, single- or multi-process.

    python training/pretrain.py --config training/configs/demo.yaml                  # the README demo
    accelerate launch --num_processes 2 --cpu training/pretrain.py --config ...     # DDP (gloo on CPU)
    accelerate launch --config_file training/configs/fsdp.yaml training/pretrain.py ...   # FSDP2 on GPUs
    accelerate launch --config_file training/configs/fsdp_cpu.yaml training/pretrain.py ...   # FSDP2, 2 CPU processes
    python training/pretrain.py --config training/configs/demo.yaml --resume       # continue after a kill

Settings come from the dataclass ``PretrainConfig``: its defaults, then the YAML ``--config``, then
command-line flags (``--max_steps 100`` or ``--max-steps 100``). Model: a preset from
``training/configs/presets`` (``jpmhc-tiny``, ``jpmhc-small``, ``jpmhc-135m``) or a ``JPmHCConfig`` JSON, with
``--mixer``/``--num_streams`` overrides; or ``--init_from`` a JPmHC checkpoint or a Llama checkpoint (converted
function-preservingly by ``hf_jpmhc.conversion.llama``). Data: see ``hf_jpmhc.data.text``.

Output directory:
    checkpoints/checkpoint-N   atomic ``accelerator.save_state`` checkpoints (the last ``save_total_limit``)
    logs/metrics.jsonl         one record per logged step: loss, lr, grad_norm, tokens/s, seconds per step, the
                               H dynamics (hc/…, ``hf_jpmhc.diagnostics.dynamics``), val_loss, val_ppl
    final/                     Hub-ready ``save_pretrained`` directory: config with auto_map, code, tokenizer, README.md
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_jpmhc import HyperConnectionConfig, JPmHCConfig, JPmHCForCausalLM  # noqa: E402
from hf_jpmhc.data.text import SMOLLM2_TOKENIZER, build_lm_datasets, load_tokenizer  # noqa: E402
from hf_jpmhc.errors import user_errors  # noqa: E402
from hf_jpmhc.loading import check_checkpoint, load_pretrained  # noqa: E402
from training.common import (  # noqa: E402
    CheckpointManager,
    HyperConnectionTrainingConfig,
    MetricsLogger,
    TrainState,
    build_accelerator,
    build_optimizer,
    build_scheduler,
    check_ranges,
    parse_script_config,
    prepare_fsdp_units,
    save_final_model,
    seed_everything,
    train_loop,
)

PRESETS_DIR = Path(__file__).resolve().parent / "configs" / "presets"


ARCHITECTURES = ("jpmhc", "llama")


@dataclass
class PretrainConfig(HyperConnectionTrainingConfig):
    """Every setting of a pretraining run (YAML keys and ``--flags`` use these names); the hyper-connections'
    optimiser and monitoring settings come from ``HyperConnectionTrainingConfig``."""

    output_dir: str = field(default="runs/pretrain", metadata={"help": "checkpoints/, logs/ and final/ go here"})
    # model
    model: str = field(default="jpmhc-tiny", metadata={"help": "preset name (training/configs/presets) or JPmHCConfig JSON"})
    architecture: str = field(default="jpmhc", metadata={
        "help": "'jpmhc', or 'llama': transformers' LlamaForCausalLM of the preset's shape (the n = 1 baseline)"})
    init_from: str | None = field(default=None, metadata={"help": "JPmHC or Llama checkpoint directory to start from"})
    mixer: str | None = field(default=None, metadata={"help": "override the preset's mixer"})
    num_streams: int | None = field(default=None, metadata={"help": "override the preset's number of streams"})
    kernel_backend: str | None = field(default=None, metadata={
        "help": "override the preset's kernel_backend: auto, torch, triton, or compiled (the fast CPU path)"})
    # data
    dataset: str = field(default="shakespeare", metadata={"help": "'shakespeare' (offline), a local path or a Hub dataset"})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name"})
    text_column: str = field(default="text", metadata={"help": "column holding the documents"})
    tokenizer: str | None = field(
        default=None, metadata={"help": "'smollm2', 'byte', a directory or Hub name (default: init_from's, else smollm2)"}
    )
    block_size: int = field(default=128, metadata={"help": "tokens per training sequence"})
    val_fraction: float = field(default=0.05, metadata={"help": "held-out share of the packed blocks"})
    eval_blocks: int = field(default=128, metadata={"help": "validation blocks per evaluation (0: all)"})
    # optimisation
    batch_size: int = field(default=16, metadata={"help": "global micro-batch (sequences), split over processes"})
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    lr_scheduler: str = field(default="cosine", metadata={"help": "any transformers.get_scheduler name"})
    warmup_steps: int = 20
    max_steps: int = 300
    max_grad_norm: float = 1.0
    mixed_precision: str | None = field(default=None, metadata={
        "help": "no, bf16, or fp16 (GPU only); default: accelerate launch's --mixed_precision, else no"})
    seed: int = 0
    # bookkeeping
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    save_total_limit: int = 2
    resume: bool = field(default=False, metadata={"help": "continue from the last complete checkpoint in output_dir"})
    stop_after: int | None = field(default=None, metadata={"help": "stop (with a checkpoint) at this step; resume later"})
    push_to_hub: str | None = field(default=None, metadata={"help": "also upload final/ to this Hub repo id"})

    def __post_init__(self):
        check_ranges(self, positive=("batch_size", "max_steps", "max_grad_norm", "log_every", "save_total_limit", "stop_after"),
                     non_negative=("learning_rate", "weight_decay", "warmup_steps", "eval_every", "save_every", "eval_blocks"))


def parse_config(argv: list[str] | None = None) -> PretrainConfig:
    """Defaults ← YAML (``--config``) ← command-line flags. Unknown YAML keys and invalid values raise ValueError."""
    config = parse_script_config(PretrainConfig, argv)
    if config.architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {config.architecture!r}")
    if config.architecture == "llama" and (config.init_from or config.mixer or config.num_streams):
        raise ValueError("architecture='llama' is the plain baseline: drop init_from, mixer and num_streams")
    config.validate_hyper_connection_training()
    return config


# ----------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------


def model_config_from(config: PretrainConfig, vocab_size: int, tokenizer) -> JPmHCConfig:
    """A preset or JSON file, with the tokenizer's vocab/special ids and the mixer/num_streams overrides."""
    path = PRESETS_DIR / f"{config.model}.json" if not config.model.endswith(".json") else Path(config.model)
    if not path.is_file():
        presets = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
        raise ValueError(f"model={config.model!r} is neither a preset ({', '.join(presets)}) nor a JSON file")
    values = {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if not k.startswith("_")}
    values.pop("model_type", None)
    values.update(vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    values.update(_hc_overrides(config), **_runtime_overrides(config))
    return JPmHCConfig(**values)


def _hc_overrides(config: PretrainConfig) -> dict:
    return {k: v for k, v in (("mixer", config.mixer), ("num_streams", config.num_streams)) if v is not None}


def _runtime_overrides(config: PretrainConfig) -> dict:
    """Config fields that change how the model runs, not its function: allowed on any checkpoint."""
    return {"kernel_backend": config.kernel_backend} if config.kernel_backend is not None else {}


def build_model(config: PretrainConfig, tokenizer) -> tuple[JPmHCForCausalLM | LlamaForCausalLM, str | None]:
    """The model to train and, for ``init_from``, the base model's name for the model card."""
    if config.init_from is None:
        model_config = model_config_from(config, len(tokenizer), tokenizer)
        if config.architecture == "llama":
            return LlamaForCausalLM(llama_config_of(model_config)), None
        return JPmHCForCausalLM(model_config), None
    check_checkpoint(config.init_from)
    source = AutoConfig.from_pretrained(config.init_from)
    if source.model_type == "jpmhc":
        overrides = _hc_overrides(config)
        changed = {k: v for k, v in overrides.items() if getattr(source, k) != v}
        if changed:
            raise ValueError(f"init_from={config.init_from!r} is a JPmHC checkpoint; it cannot change {changed}")
        model = load_pretrained(JPmHCForCausalLM, config.init_from, dtype=torch.float32, **_runtime_overrides(config))
        return model, config.init_from
    if source.model_type == "llama":
        from hf_jpmhc.conversion.llama import convert_llama

        model = convert_llama(config.init_from, num_streams=config.num_streams or 4, mixer=config.mixer or "stiefel",
                              **_runtime_overrides(config))  # fmt: skip
        return model.float(), config.init_from
    raise ValueError(f"init_from={config.init_from!r} has model_type={source.model_type!r}; expected 'jpmhc' or 'llama'")


def llama_config_of(config: JPmHCConfig) -> LlamaConfig:
    """The ``LlamaConfig`` of the same shape: ``config`` without its hyper-connection fields."""
    hc_fields = {f.name for f in dataclasses.fields(HyperConnectionConfig)}
    values = {k: v for k, v in config.to_dict().items() if k not in hc_fields}
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        values.pop(key, None)
    return LlamaConfig(**values)


def check_compatible(model_config, tokenizer, block_size: int) -> None:
    if block_size > model_config.max_position_embeddings:
        raise ValueError(
            f"block_size={block_size} exceeds the model's max_position_embeddings={model_config.max_position_embeddings}; "
            "lower block_size or raise max_position_embeddings"
        )
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model_config.vocab_size}")


# ----------------------------------------------------------------------------------------------------
# loss and evaluation
# ----------------------------------------------------------------------------------------------------


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy (mean over the batch's predicted tokens) and the number of tokens."""
    input_ids = batch["input_ids"]  # (B, T)
    return model(input_ids=input_ids, labels=input_ids).loss, input_ids.numel()


@torch.no_grad()
def block_losses(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each block: (B, T) → (B,)."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)


def make_evaluator(accelerator, val_loader):
    """``evaluate(model)`` → validation loss (nats/token) and perplexity over ``val_loader``, all processes."""

    def evaluate(model) -> dict[str, float]:
        model.eval()
        losses = [accelerator.gather_for_metrics(block_losses(model, batch["input_ids"])) for batch in val_loader]
        val_loss = torch.cat(losses).mean().item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    return evaluate


# ----------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------


def resolve_tokenizer(config: PretrainConfig):
    if config.tokenizer is not None:
        return load_tokenizer(config.tokenizer)
    if config.init_from is not None and (Path(config.init_from) / "tokenizer_config.json").is_file():
        return load_tokenizer(config.init_from)
    return load_tokenizer(SMOLLM2_TOKENIZER)


def training_card(config: PretrainConfig, state: TrainState, accelerator, n_train: int, seconds: float) -> str:
    """The "Training" section of the model card (markdown)."""
    rows = {
        "data": f"`{config.dataset}`" + (f" (`{config.dataset_config}`)" if config.dataset_config else ""),
        "tokenizer": f"`{config.tokenizer or 'smollm2'}`",
        "sequence length": config.block_size,
        "training blocks": f"{n_train:,}",
        "global batch": f"{config.batch_size} × {config.gradient_accumulation_steps} accumulation = "
        f"{config.batch_size * config.gradient_accumulation_steps} sequences",
        "optimiser": f"AdamW (β = {config.adam_beta1}, {config.adam_beta2}), weight decay {config.weight_decay}, "
        f"clip {config.max_grad_norm}",
        "schedule": f"{config.lr_scheduler}, peak lr {config.learning_rate}, {config.warmup_steps} warmup steps",
        "steps / tokens": f"{state.step:,} / {state.items:,}",
        "processes / precision": f"{accelerator.num_processes} × {accelerator.device.type} / {accelerator.mixed_precision}",
        "seed": config.seed,
        "wall time": f"{seconds / 60:.1f} min",
    }
    table = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    return f"Pretrained with `training/pretrain.py` (🤗 Accelerate).\n\n| | |\n|---|---|\n{table}"


@user_errors(Path(__file__).name)
def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(argv)
    output_dir = Path(config.output_dir)
    accelerator = build_accelerator(
        output_dir, seed=config.seed, gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
    )  # fmt: skip
    if config.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the {accelerator.num_processes} processes")
    seed_everything(config.seed)
    tokenizer = resolve_tokenizer(config)
    model, base_model = build_model(config, tokenizer)
    check_compatible(model.config, tokenizer, config.block_size)
    with accelerator.main_process_first():  # one process tokenizes and caches, the others read the cache
        data = build_lm_datasets(
            config.dataset, tokenizer, config.block_size, text_column=config.text_column,
            dataset_config=config.dataset_config, val_fraction=config.val_fraction, seed=config.seed,
        ).with_format("torch")  # fmt: skip
    val = data["validation"]
    val = val.select(range(min(config.eval_blocks, len(val)))) if config.eval_blocks else val
    if len(data["train"]) < config.batch_size:
        raise ValueError(f"only {len(data['train'])} training blocks for batch_size={config.batch_size}")
    train_loader = DataLoader(data["train"], batch_size=config.batch_size, shuffle=True, drop_last=True)
    val_loader = DataLoader(val, batch_size=config.batch_size)

    model = prepare_fsdp_units(accelerator, model)  # FSDP2 only; before the optimizer sees the parameters
    optimizer = build_optimizer(model, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                                betas=(config.adam_beta1, config.adam_beta2), hc_lr_scale=config.hc_lr_scale,
                                hc_weight_decay=config.hc_weight_decay)  # fmt: skip
    scheduler = build_scheduler(optimizer, config.lr_scheduler, warmup_steps=config.warmup_steps, max_steps=config.max_steps)
    monitor = config.build_monitor(model, {"input_ids": val[: config.hc_probe_size]["input_ids"].to(accelerator.device)})
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler
    )
    state = TrainState()
    checkpoints = CheckpointManager(accelerator, output_dir / "checkpoints", state, keep=config.save_total_limit)
    resumed = checkpoints.resume() if config.resume else None
    if resumed:
        accelerator.print(f"resumed from {resumed} (step {state.step})")
    logger = MetricsLogger(accelerator, output_dir / "logs", resume_step=state.step if resumed else None,
                           run_config=dataclasses.asdict(config))  # fmt: skip
    unwrapped = accelerator.unwrap_model(model)
    kind = (f"{unwrapped.config.mixer} mixer, n={unwrapped.config.num_streams}"
            if isinstance(unwrapped.config, HyperConnectionConfig) else "Llama (no hyper-connections)")  # fmt: skip
    accelerator.print(
        f"{kind}: {unwrapped.num_parameters():,} parameters; "
        f"{len(data['train']):,} training blocks of {config.block_size} tokens; {accelerator.num_processes} process(es)"
    )
    start = time.perf_counter()
    evaluate = make_evaluator(accelerator, val_loader)
    metrics = train_loop(
        accelerator, model, optimizer, scheduler, train_loader, lm_loss, state,
        max_steps=config.max_steps, logger=logger, checkpoints=checkpoints, save_every=config.save_every,
        evaluate=evaluate, eval_every=config.eval_every, log_every=config.log_every,
        max_grad_norm=config.max_grad_norm, stop_after=config.stop_after, monitor=monitor,
    )  # fmt: skip
    logger.close()
    if state.step < config.max_steps:  # stopped early on purpose
        accelerator.print(f"stopped at step {state.step}; continue with --resume. Checkpoints: {checkpoints.directory}")
        return metrics
    metrics = metrics or evaluate(model)  # resumed from the final checkpoint: nothing left to train

    from huggingface_hub import EvalResult

    evaluation = (f"Held-out split of `{config.dataset}` ({len(val):,} blocks of {config.block_size} tokens): "
                  f"loss {metrics['val_loss']:.4f} nats/token, perplexity {metrics['val_ppl']:.2f}.")  # fmt: skip
    final = save_final_model(
        accelerator, model, output_dir / "final", preprocessor=tokenizer, base_model=base_model,
        training=training_card(config, state, accelerator, len(data["train"]), time.perf_counter() - start),
        evaluation=evaluation,
        eval_results=[EvalResult(task_type="text-generation", dataset_type=config.dataset, dataset_name=config.dataset,
                                 metric_type="perplexity", metric_value=round(metrics["val_ppl"], 4))],
    )  # fmt: skip
    accelerator.print(
        f"validation loss {metrics['val_loss']:.4f}, perplexity {metrics['val_ppl']:.2f}\n"
        f"checkpoint (Hub-ready): {final.resolve()}\nlogs: {logger.path.resolve()}\n"
        f"training state: {checkpoints.directory.resolve()}"
    )
    if config.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(config.push_to_hub, exist_ok=True)
        api.upload_folder(repo_id=config.push_to_hub, folder_path=str(final), commit_message="Upload JPmHC checkpoint")
        accelerator.print(f"pushed to https://huggingface.co/{config.push_to_hub}")
    return metrics


if __name__ == "__main__":
    main()
