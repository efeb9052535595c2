"""The training machinery shared by every script in ``training/`` — model-agnostic, built on 🤗 Accelerate.

A script supplies a model, a ``DataLoader`` and a loss function; this module supplies the rest:

    accelerator = build_accelerator(output_dir, seed=0, gradient_accumulation_steps=2)
    optimizer   = build_optimizer(model, learning_rate=3e-4, weight_decay=0.1)
    scheduler   = build_scheduler(optimizer, "cosine", warmup_steps=20, max_steps=500)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    state       = TrainState()
    checkpoints = CheckpointManager(accelerator, output_dir / "checkpoints", state, keep=2)
    if resume: checkpoints.resume()                     # the last complete checkpoint, if any
    logger      = MetricsLogger(accelerator, output_dir / "logs", resume_step=state.step)
    train_loop(accelerator, model, optimizer, scheduler, train_loader, loss_fn, state,
               max_steps=500, checkpoints=checkpoints, logger=logger, evaluate=eval_fn)

Guarantees:

* **Exact resume.** The data order of epoch e is a permutation seeded by ``seed + e`` (Accelerate's
  seedable sampler); a checkpoint holds model, optimizer, scheduler, RNG states and the ``TrainState``
  (step, epoch, micro-batches consumed in the epoch), and resuming skips the consumed batches with
  ``accelerator.skip_first_batches``. A resumed run therefore computes the same losses as one that was
  never interrupted (bitwise on CPU).
* **Atomic checkpoints.** ``save_state`` writes into ``.tmp-checkpoint-N`` and the directory is renamed to
  ``checkpoint-N`` only when every process has finished writing: a ``checkpoint-*`` directory is always
  complete, and a kill at any moment leaves at worst a temporary directory that the next run removes.
* **Process-count independence.** ``split_batches=True``: the ``DataLoader``'s batch size is the global
  micro-batch, divided among the processes, so 1 or N processes see the same global batches and DDP's
  gradient average equals the single-process gradient (up to float summation order).
* **Logs.** ``MetricsLogger`` appends one JSON object per line to ``metrics.jsonl`` (always) and mirrors
  scalars to TensorBoard when ``tensorboard`` is installed.
* **Bad input.** Settings are checked when parsed (``check_ranges``), models and data are built before anything
  is written, and a script's ``main`` runs under ``hf_jpmhc.errors.user_errors``: a bad setting or checkpoint
  ends with one line and exit status 2, and leaves no output directory behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    compare_versions,
    parse_choice_from_env,
    parse_flag_from_env,
    set_seed,
)
from tqdm.auto import tqdm
import yaml
from transformers import HfArgumentParser, get_scheduler

from hf_jpmhc.ops.cpu import keep_freed_memory
from hf_jpmhc.outputs import STAGING_PREFIX, atomic_write_text, ordinary_permissions, staged_directory

MIXED_PRECISIONS = ("no", "fp16", "bf16")
# The first accelerate whose FSDP2 trains these models correctly (tests/test_fsdp.py): 1.10–1.12 load a sharded
# optimizer checkpoint into an empty state dict (a resumed run restarts AdamW's moments), and before 1.10 the
# optimizer is remapped by data_ptr(), which is 0 for every parameter sharded before `prepare` (float32_units).
FSDP_MIN_ACCELERATE = "1.13"
CHECKPOINT_PREFIX = "checkpoint-"

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]  # (model, batch) → (mean loss, items in batch)
EvalFn = Callable[[torch.nn.Module], dict[str, float]]  # model → metrics, e.g. {"val_loss": …, "val_ppl": …}


def script_name(config_class: type) -> str:
    """The file name of the script defining ``config_class`` (``pretrain.py``): the ``prog`` of its messages."""
    return Path(sys.modules[config_class.__module__].__file__).name


def parse_script_config(config_class: type, argv: list[str] | None = None):
    """A script's dataclass config from defaults ← YAML (``--config``) ← command-line flags.

    Unknown YAML keys raise ValueError listing the valid ones; flags use ``HfArgumentParser``'s names.
    """
    module = sys.modules[config_class.__module__]
    parser = HfArgumentParser(config_class, prog=script_name(config_class), description=module.__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help=f"YAML file of {config_class.__name__} fields")
    argv = sys.argv[1:] if argv is None else argv
    known, _ = parser.parse_known_args(argv)
    if known.config:
        values = yaml.safe_load(Path(known.config).read_text(encoding="utf-8")) or {}
        fields = {f.name for f in dataclasses.fields(config_class)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"{known.config}: unknown setting(s) {unknown}; valid: {sorted(fields)}")
        parser.set_defaults(**values)
    config, _ = parser.parse_args_into_dataclasses(args=argv)  # _: the --config namespace
    return config


def check_ranges(config, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """ValueError naming the first of ``config``'s settings out of range (None, meaning unset, is allowed)."""
    for names, bound, holds in ((positive, "> 0", lambda v: v > 0), (non_negative, ">= 0", lambda v: v >= 0)):
        for name in names:
            value = getattr(config, name)
            if value is not None and not holds(value):
                raise ValueError(f"{name} must be {bound}, got {value!r}")


@dataclass
class HyperConnectionTrainingConfig:
    """Settings of how the hyper-connections train and are watched, shared by ``pretrain.py`` and
    ``finetune_vision.py`` (their configs inherit these fields; they do nothing for models without hyper-connections).

    The optimiser options are the lever against identity degeneration (docs/mixer_study.md): with Adam, a parameter
    moves ≈ lr per step whatever its gradient's scale, so H leaves a saturated start (Sinkhorn's logits 4·I, say)
    only as fast as the hyper-connections' learning rate allows.
    """

    hc_lr_scale: float = field(default=1.0, metadata={
        "help": "learning-rate multiplier for the hyper-connection parameters (Φ, b, α of every site and the collapse head)"})
    hc_weight_decay: float | None = field(default=None, metadata={
        "help": "weight decay of the hyper-connections' projections Φ (default: weight_decay; b and α are never decayed)"})
    hc_monitor: bool = field(default=True, metadata={
        "help": "log the H dynamics (hf_jpmhc.diagnostics.dynamics) on a fixed probe batch at every log step"})
    hc_monitor_sites: bool = field(default=True, metadata={"help": "also log the per-site values, not only aggregates"})
    hc_probe_size: int = field(default=2, metadata={"help": "probe batch of the H dynamics: held-out sequences / images"})
    degeneration_threshold: float = field(default=0.01, metadata={
        "help": "warn when a learned mixer is within this (Frobenius) of its initialisation or of I at degeneration_step"})
    degeneration_step: int | None = field(default=200, metadata={
        "help": "the step of the identity-degeneration check (none: no check)"})

    def validate_hyper_connection_training(self) -> None:
        if not (self.hc_lr_scale > 0 and math.isfinite(self.hc_lr_scale)):
            raise ValueError(f"hc_lr_scale must be a positive number, got {self.hc_lr_scale}")
        if self.hc_weight_decay is not None and self.hc_weight_decay < 0:
            raise ValueError(f"hc_weight_decay must be >= 0, got {self.hc_weight_decay}")
        if self.hc_probe_size < 1:
            raise ValueError(f"hc_probe_size must be >= 1, got {self.hc_probe_size}")

    def build_monitor(self, model: torch.nn.Module, probe: dict):
        """The ``DynamicsMonitor`` of ``model`` on ``probe`` (model keyword arguments), or None: monitoring off or
        a model without hyper-connections."""
        from hf_jpmhc.diagnostics.dynamics import DynamicsMonitor
        from hf_jpmhc.models.hyper_connection import HyperConnection

        if not self.hc_monitor or not any(isinstance(m, HyperConnection) for m in model.modules()):
            return None
        return DynamicsMonitor(model, probe, per_site=self.hc_monitor_sites,
                               degeneration_threshold=self.degeneration_threshold,
                               degeneration_step=self.degeneration_step)  # fmt: skip


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every process the same seed: identical initial weights)."""
    set_seed(seed)


def build_accelerator(
    output_dir: str | Path,
    *,
    seed: int = 0,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str | None = None,
) -> Accelerator:
    """An ``Accelerator`` with gradient accumulation, a mixed-precision flag, seedable data order and split batches.

    ``mixed_precision`` is "no", "fp16" or "bf16" (autocast, or under FSDP2 the cast of its ``MixedPrecisionPolicy``;
    master weights stay float32), or None for Accelerate's own setting (``accelerate launch --mixed_precision``, its
    config file), else "no": an explicit value overrides the launcher's. None is resolved here as Accelerate resolves
    it, so that the Accelerator always gets an explicit value: Accelerate's state is process-wide, and given None a
    second Accelerator in the same process would keep whatever precision the first one fixed, where a different
    explicit value raises. fp16 on CPU is refused: Accelerate enables autocast for it only on accelerators, so it
    would train in plain float32 (on CPU, bf16 is the mixed precision that autocasts). The data order of epoch e is
    seeded by ``seed + e``; TensorBoard logs go to ``output_dir/logs`` when it is installed.
    On a machine with no accelerator device, ``cpu=True`` lets processes started by ``accelerate launch
    --multi_gpu`` (torchrun) join a gloo process group: Accelerate only forms a CPU group when told ``cpu``;
    a launch with an FSDP config (``training/configs/fsdp_cpu.yaml``) then shards with FSDP2 on CPU
    (``enable_fsdp_on_cpu``); and glibc is told to keep freed memory (``hf_jpmhc.ops.cpu.keep_freed_memory``), so
    that the buffers a step reallocates are not page-faulted in again at every step.
    """
    if mixed_precision is None:  # what `accelerate launch` exports from its flag or config file
        mixed_precision = parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no")
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {mixed_precision!r}")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    check_fsdp_launch()
    output_dir = Path(output_dir)
    cpu = not torch.accelerator.is_available()
    if cpu:
        keep_freed_memory()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=seed),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        log_with="tensorboard" if tensorboard_available() else None,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("mixed_precision='fp16' does not autocast on CPU (Accelerate would train in float32); "
                         "use mixed_precision='bf16' on CPU, or fp16 on a GPU")  # fmt: skip
    if cpu and fsdp_launched():
        enable_fsdp_on_cpu(accelerator)
    return accelerator


def fsdp_launched() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (its launcher sets ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp_launch() -> None:
    """ValueError unless an FSDP launch is one these scripts train correctly: accelerate >= ``FSDP_MIN_ACCELERATE``,
    FSDP2 (FSDP1 would cast the float32 hyper-connections to bf16), no ``fsdp_cpu_ram_efficient_loading`` (see
    ``float32_units``)."""
    if not fsdp_launched():
        return
    if compare_versions("accelerate", "<", FSDP_MIN_ACCELERATE):
        raise ValueError(f"FSDP needs accelerate >= {FSDP_MIN_ACCELERATE} (older versions resume FSDP2 with fresh "
                         "optimizer moments): pip install -U accelerate")  # fmt: skip
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError("the accelerate config selects FSDP version 1; training/ shards with FSDP2 only: set "
                         "fsdp_version: 2 in its fsdp_config")  # fmt: skip
    if parse_flag_from_env("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise ValueError("the accelerate config sets fsdp_cpu_ram_efficient_loading (true unless set); set it to "
                         "false: every process builds the model, and its float32 units are sharded before "
                         "Accelerate's")  # fmt: skip


def enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Make ``accelerator`` shard with FSDP on a CPU (gloo) process group, as it does on GPUs.

    Accelerate forms an FSDP state only on accelerator devices: ``AcceleratorState`` sets ``DistributedType.FSDP``
    and keeps the plugin it built from the launcher's ``FSDP_*`` variables in its multi-GPU branch, and drops
    them for ``cpu=True`` — an FSDP launch on CPU would silently train with DDP. torch's FSDP2 (``fully_shard``)
    runs on CPU over gloo, so this sets what that branch sets: the plugin, with the mixed-precision policy, and
    the distributed type of ``AcceleratorState`` and ``PartialState`` (the latter is copied into every new
    ``AcceleratorState()``). Everything else — sharding, sharded checkpoints, the gathered state dict — is
    Accelerate's FSDP2 code, unchanged.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def prepare_fsdp_units(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Under FSDP2, the FSDP units Accelerate's wrapping would get wrong for these models; a no-op otherwise. Call it
    before the optimizer is built (it replaces the float32 modules' parameters by their shards).

    Accelerate wraps every class of ``_no_split_modules`` present in the model (``TRANSFORMER_BASED_WRAP``), then the
    input embedding and, as the "tail", the final norm and the output embedding, then the model.

    * ``float32_units``: the modules kept in float32 get their own units that never cast their parameters.
    * ``layer_classes_without_the_input_embedding``: a class holding the input embedding (ViT's ``ViTEmbeddings``)
      is left out of the layer classes; Accelerate (>= 1.14) would wrap it and then wrap the embedding inside it again,
      which ``fully_shard`` refuses — any ViT, ours or transformers', fails so. The embedding gets its own unit;
      the rest of that module (CLS token, position embeddings) stays with the model's.
    """
    if not getattr(accelerator, "is_fsdp2", False):  # (absent before accelerate 1.6)
        return model
    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap is None:  # not chosen in the config: Accelerate's default, corrected
        plugin.transformer_cls_names_to_wrap = layer_classes_without_the_input_embedding(model)
    float32_units(model, plugin)
    return model


def layer_classes_without_the_input_embedding(model: torch.nn.Module) -> list[str]:
    """The model's ``_no_split_modules`` classes that it contains, except those containing its input embedding."""
    embedding = model.get_input_embeddings()
    found = {type(m).__name__: m for m in model.modules()}
    return [name for name in model._no_split_modules or ()
            if name in found and not any(m is embedding for m in found[name].modules())]  # fmt: skip


def float32_units(model: torch.nn.Module, plugin) -> None:
    """Give each module ``model`` keeps in float32 its own FSDP2 unit with the default policy (no casting).

    ``_keep_in_fp32_modules_strict`` names the modules transformers loads in float32 whatever the ``dtype`` (for
    JPmHC: the hyper-connections and the stream collapse, SPEC §1). Accelerate wraps each decoder layer in one FSDP
    unit whose ``MixedPrecisionPolicy`` casts every parameter it gathers to ``param_dtype`` (bf16) — the
    hyper-connections' too. Wrapped first, they form units whose float32 parameters are gathered, used and their
    gradients reduced in float32, and whose inputs are left in the caller's dtype; Accelerate's wrapping then skips
    them, and the layer's unit holds the rest. A hyper-connection is called through ``read`` and ``write``, not
    ``forward``: those are registered as its FSDP forward methods.

    This is why ``fsdp_cpu_ram_efficient_loading`` must be off: Accelerate would then move the model to the meta
    device and broadcast full tensors from process 0, which units sharded here are not.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for module in float32_modules(model):
        fully_shard(module, reshard_after_forward=plugin.reshard_after_forward, offload_policy=plugin.cpu_offload)
        for method in ("read", "write"):
            if hasattr(module, method):
                register_fsdp_forward_method(module, method)


def float32_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules ``model`` keeps in float32: those named (last name component) in
    ``_keep_in_fp32_modules_strict``."""
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return [module for name, module in model.named_modules() if name.rpartition(".")[2] in keep]


@contextlib.contextmanager
def float32_units_gathered(accelerator: Accelerator, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``with float32_units_gathered(accelerator, model) as model:`` — under FSDP2 the float32 units
    (``float32_units``) keep their parameters gathered from their first use in the block to its end, then are
    sharded again; a no-op otherwise (collective).

    The H-dynamics monitor reads each hyper-connection's parameters after its ``read`` has returned
    (``hf_jpmhc.diagnostics.dynamics``), when FSDP would already have sharded them again.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in float32_modules(model) if isinstance(module, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(accelerator.state.fsdp_plugin.reshard_after_forward, recurse=False)


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------
# optimiser and schedule
# ----------------------------------------------------------------------------------------------------


def build_optimizer(
    model: torch.nn.Module,
    *,
    learning_rate: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    hc_lr_scale: float = 1.0,
    hc_weight_decay: float | None = None,
) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only: biases, norm gains and the hyper-connections' scalars α
    and biases b (all 1-D) are not decayed (nanoGPT's convention).

    The hyper-connection parameters (``hyper_connection_parameters``) learn at ``learning_rate · hc_lr_scale`` and
    their projections Φ decay with ``hc_weight_decay`` (None: ``weight_decay``), as several reference mHC
    implementations set them apart with optimizer groups. Groups with equal settings are merged, so the defaults
    give the two groups (decayed, not decayed) of a model without hyper-connections.
    """
    hc = {id(p) for p in hyper_connection_parameters(model)}
    hc_decay = weight_decay if hc_weight_decay is None else hc_weight_decay
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            in_hc = id(p) in hc
            lr = learning_rate * hc_lr_scale if in_hc else learning_rate
            decay = (hc_decay if in_hc else weight_decay) if p.ndim >= 2 else 0.0
            groups.setdefault((lr, decay), []).append(p)
    param_groups = [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]
    return torch.optim.AdamW(param_groups, lr=learning_rate, betas=betas, eps=eps)


def hyper_connection_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of every ``HyperConnection`` and ``StreamCollapse`` (Φ, b, α): empty for a plain model."""
    from hf_jpmhc.models.hyper_connection import HyperConnection, StreamCollapse

    return [p for m in model.modules() if isinstance(m, (HyperConnection, StreamCollapse)) for p in m.parameters()]


def build_scheduler(optimizer, name: str = "cosine", *, warmup_steps: int, max_steps: int):
    """``transformers.get_scheduler``: linear warmup over ``warmup_steps``, then ``name`` decay to ``max_steps``.

    The schedule counts optimiser updates. Accelerate's prepared scheduler steps once per update and once per
    process unless ``split_batches`` is set — ``build_accelerator`` sets it, so these counts are exact.
    """
    if not 0 <= warmup_steps <= max_steps:
        raise ValueError(f"warmup_steps must be in 0..max_steps={max_steps}, got {warmup_steps}")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)


# ----------------------------------------------------------------------------------------------------
# state and checkpoints
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Counters saved in every checkpoint (Accelerate's ``register_for_checkpointing`` protocol).

    step:           optimiser updates done.
    epoch:          the current pass over the training data.
    batch_in_epoch: micro-batches of ``epoch`` already consumed (skipped on resume).
    items:          training items seen (tokens for an LM, images for a classifier), over all processes.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    items: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class CheckpointManager:
    """Periodic, atomic ``accelerator.save_state`` checkpoints under ``directory`` with a retention limit.

    ``save()`` is collective (every process calls it); ``resume()`` loads the newest complete checkpoint.
    """

    def __init__(self, accelerator: Accelerator, directory: str | Path, state: TrainState, *, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep (the checkpoint retention limit) must be >= 1, got {keep}")
        self.accelerator, self.directory, self.state, self.keep = accelerator, Path(directory), state, keep
        accelerator.register_for_checkpointing(state)
        if accelerator.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob(f"{STAGING_PREFIX}*"):  # from a run killed while saving
                shutil.rmtree(leftover, ignore_errors=True)
        accelerator.wait_for_everyone()

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        found = [p for p in self.directory.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]
        return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def save(self) -> Path:
        """Write the state at ``state.step`` aside, rename it into place, then drop checkpoints beyond ``keep``."""
        name = f"{CHECKPOINT_PREFIX}{self.state.step}"
        final, staging = self.directory / name, self.directory / f"{STAGING_PREFIX}{name}"
        self.accelerator.save_state(str(staging))  # collective; each process writes its own RNG state
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            ordinary_permissions(staging)  # safetensors leaves 0600
            if final.exists():  # the same step saved again (e.g. the final step after a resume)
                shutil.rmtree(final)
            os.replace(staging, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def resume(self) -> Path | None:
        """Load the newest complete checkpoint (model, optimiser, scheduler, RNG, ``TrainState``); None if none."""
        path = self.latest()
        if path is not None:
            self.accelerator.load_state(str(path))
        return path


# ----------------------------------------------------------------------------------------------------
# logging
# ----------------------------------------------------------------------------------------------------


class MetricsLogger:
    """One JSON object per line in ``directory/metrics.jsonl`` (main process), mirrored to the Accelerate trackers.

    On resume, pass ``resume_step``: records after that step (written by the interrupted run after its last
    checkpoint, and about to be recomputed) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, accelerator: Accelerator, directory: str | Path, *, resume_step: int | None = None,
                 run_config: dict | None = None):  # fmt: skip
        self.accelerator = accelerator
        self.path = Path(directory) / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                self.path.unlink(missing_ok=True)
            elif self.path.exists():
                kept = [line for line in read_jsonl(self.path) if line.get("step", 0) <= resume_step]
                atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if accelerator.log_with:
            accelerator.init_trackers("run", config=_scalars(run_config or {}))

    def log(self, metrics: dict, step: int) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.accelerator.log_with:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.accelerator.log_with:
            self.accelerator.end_training()


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _scalars(config: dict) -> dict:
    """TensorBoard's hparams accept only scalars and strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


# ----------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------


def resumable_batches(accelerator: Accelerator, loader, state: TrainState) -> Iterator[dict]:
    """Batches forever, epoch after epoch, starting after the ``state.batch_in_epoch`` already consumed.

    ``set_epoch`` seeds the epoch's permutation (``seed + epoch``); ``skip_first_batches`` reuses the same
    sampler, so the batches after a resume are exactly those the interrupted run would have seen.
    """
    while True:
        loader.set_epoch(state.epoch)
        epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        for batch in epoch_loader:
            state.batch_in_epoch += 1
            yield batch
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def train_loop(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    train_loader,
    loss_fn: LossFn,
    state: TrainState,
    *,
    max_steps: int,
    logger: MetricsLogger,
    checkpoints: CheckpointManager | None = None,
    save_every: int = 0,
    evaluate: EvalFn | None = None,
    eval_every: int = 0,
    log_every: int = 1,
    max_grad_norm: float | None = 1.0,
    stop_after: int | None = None,
    monitor: Callable[[torch.nn.Module, int], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Train from ``state.step`` to ``max_steps`` optimiser updates; return the last evaluation metrics.

    Per update: ``gradient_accumulation_steps`` micro-batches under ``accelerator.accumulate``, gradient
    clipping to ``max_grad_norm`` (None: off), AdamW step, scheduler step. Every ``log_every`` updates the
    loss (mean over micro-batches and processes), learning rate, gradient norm, items/s, and the wall and CPU
    (process) seconds per update — the CPU time does not count waiting for a shared machine's cores — go to
    ``logger``, with ``monitor(unwrapped model, step)``'s metrics (e.g. ``DynamicsMonitor``'s H dynamics) and the
    seconds it took; every ``eval_every`` updates (and at the end) ``evaluate(model)``; every ``save_every`` updates (and at
    the end) a checkpoint. ``stop_after`` ends early at that step, after a checkpoint — a scheduled
    preemption: the LR schedule still runs to ``max_steps`` and ``--resume`` continues. A resumed run logs
    the same records as an uninterrupted one when checkpoints fall on log steps (``save_every`` a multiple
    of ``log_every``); otherwise its first record averages fewer updates.
    """
    accum = accelerator.gradient_accumulation_steps
    metrics: dict[str, float] = {}
    window = _Window(accelerator.device)
    progress = tqdm(total=max_steps, initial=state.step, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)  # fmt: skip
    batches = resumable_batches(accelerator, train_loader, state)
    model.train()
    while state.step < max_steps:
        grad_norm = None
        for _ in range(accum):
            with accelerator.accumulate(model):
                loss, items = loss_fn(model, next(batches))
                accelerator.backward(loss)
                if accelerator.sync_gradients and max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            # split_batches gives every process an equal share of the global micro-batch.
            window.add(loss.detach() / accum, items * accelerator.num_processes)
            state.items += items * accelerator.num_processes
        state.step += 1
        window.steps += 1
        progress.update(1)

        record: dict[str, float] = {}
        if state.step % log_every == 0 or state.step == max_steps:
            record = {"loss": window.mean_loss(accelerator), "lr": scheduler.get_last_lr()[0],
                      "items_per_s": window.rate(), "items": state.items, **window.seconds_per_step()}  # fmt: skip
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if monitor is not None:
                start = time.perf_counter()
                with float32_units_gathered(accelerator, accelerator.unwrap_model(model)) as unwrapped:
                    record.update(monitor(unwrapped, state.step))
                record["monitor_seconds"] = time.perf_counter() - start
            progress.set_postfix(loss=f"{record['loss']:.4f}")
        if evaluate is not None and (state.step == max_steps or (eval_every and state.step % eval_every == 0)):
            metrics = evaluate(model)
            record.update(metrics)
            model.train()
            progress.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if record:
            logger.log(record, state.step)
        stopping = stop_after is not None and state.step >= stop_after
        if checkpoints is not None and (state.step == max_steps or stopping or (save_every and state.step % save_every == 0)):
            path = checkpoints.save()
            progress.write(f"step {state.step}: saved checkpoint {path}")
        if record:
            window.reset()  # throughput excludes evaluation and checkpointing
        if stopping:
            break
    progress.close()
    return metrics


class _Window:
    """Loss and throughput accumulated between two log records."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.steps, self.items, self.start, self.cpu_start = 0, 0, time.perf_counter(), time.process_time()

    def add(self, loss: torch.Tensor, items: int) -> None:
        self.loss += loss
        self.items += items

    def mean_loss(self, accelerator: Accelerator) -> float:
        """Mean training loss per update over the window, averaged over the processes."""
        return accelerator.reduce(self.loss, "mean").item() / self.steps

    def rate(self) -> float:
        return self.items / (time.perf_counter() - self.start)

    def seconds_per_step(self) -> dict[str, float]:
        """Wall and CPU (this process, all its threads) seconds per update over the window."""
        return {"step_seconds": (time.perf_counter() - self.start) / self.steps,
                "step_cpu_seconds": (time.process_time() - self.cpu_start) / self.steps}  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# the final artifact
# ----------------------------------------------------------------------------------------------------


def save_final_model(accelerator: Accelerator, model: torch.nn.Module, directory: str | Path, *, preprocessor=None,
                     **card_kwargs) -> Path:  # fmt: skip
    """Write a Hub-ready ``save_pretrained`` directory atomically: weights, config (with ``auto_map``), the
    model code, the tokenizer / image processor, and a model card (``hf_jpmhc.model_card.build_model_card``
    with ``card_kwargs``: base_model, training, evaluation, eval_results, ...; JPmHC models only, a plain
    baseline is saved without a card). Collective; returns ``directory``.

    The full state dict comes from ``accelerator.get_state_dict`` (gathered under FSDP/DeepSpeed).
    """
    from hf_jpmhc import HyperConnectionConfig
    from hf_jpmhc.model_card import build_model_card

    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        with staged_directory(directory, overwrite=True) as staging:
            saved = model_to_save(accelerator.unwrap_model(model))
            saved.save_pretrained(staging, state_dict=state_dict)
            if preprocessor is not None:
                preprocessor.save_pretrained(staging)
            if isinstance(saved.config, HyperConnectionConfig):  # the card template describes JPmHC checkpoints
                build_model_card(saved, **card_kwargs).save(staging / "README.md")
    accelerator.wait_for_everyone()
    return Path(directory)


def model_to_save(model: torch.nn.Module) -> torch.nn.Module:
    """``model``, or under FSDP2 a weightless (meta-device) instance of its own class with its config and
    generation config — what ``save_pretrained(state_dict=...)`` and the model card need.

    ``fully_shard`` changes a module's class to a subclass ``FSDP<Class>`` defined in torch: ``save_pretrained`` of
    a remote-code model would copy torch's ``_fsdp_*.py`` files as the checkpoint's code and point ``auto_map`` at
    ``_fsdp_init.FSDPJPmHCForCausalLM``, and the card would name that class.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model
    own_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = own_class(model.config)
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain
