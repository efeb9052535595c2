"""What a resumed training run holds, checked against the checkpoint accelerate wrote (shared by the scripts' tests).

``record_training_runs(monkeypatch, script)`` wraps the script's ``train_loop`` (the real one still runs) and
records, for every run the script starts, what the process holds when its training loop begins — the
``TrainState`` counters, the optimiser, scheduler and model state — and the records that process itself logs.
``assert_resumed_from(run, checkpoint)`` compares that state with the files of ``checkpoint``: a ``--resume``
that loaded nothing would start at step 0 with fresh AdamW moments and fail here, even when the run's curve
(same seed, same data order) reproduces the uninterrupted one.

A checkpoint is either accelerate's plain files (one process, DDP: ``model.safetensors``, ``optimizer.bin``) or, under
FSDP, its sharded ``torch.distributed.checkpoint`` directories (``pytorch_model_fsdp_0/``, ``optimizer_0/``, keyed by
parameter name); ``saved_model_and_optimizer`` reads either.

``python -m tests.resume [--pause-in=NAME] [--record=FILE] MODULE ARGS...`` runs ``MODULE.main(ARGS)`` in a child
process (also one started by ``accelerate launch -m``). With ``--pause-in`` it stops inside ``accelerator.save_state``
while writing the directory named ``NAME`` — after the model, optimiser, scheduler and RNG files, before the
``TrainState`` — prints ``PAUSED_IN_SAVE`` and the path, and waits there to be killed. With ``--record`` the main
process saves the child's ``TrainingRun`` list to ``FILE`` (``torch.load(FILE, weights_only=False)``): the full state
each run started from (gathered from the shards under FSDP), its FSDP units and the parameter dtypes its modules
computed with.
"""

from __future__ import annotations

import copy
import importlib
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils.constants import FSDP_MODEL_NAME, OPTIMIZER_NAME, SAFE_WEIGHTS_NAME, SCHEDULER_NAME
from safetensors.torch import load_file

TRAIN_STATE_FILE = "custom_checkpoint_0.pkl"  # accelerate's name for the first registered object (TrainState)
# A resumed curve equals the uninterrupted one to float32 rounding (bitwise on CPU in practice); a restarted run's
# first losses must differ from the resumed run's by far more than that, or the comparison could not tell them apart.
CURVE_TOLERANCE = 1e-6
PAUSED_IN_SAVE = "paused inside save_state:"


@dataclass
class TrainingRun:
    """One call of the script's training loop: the state at its start and the records it logged."""

    state: dict  # TrainState.state_dict(): step, epoch, batch_in_epoch, items
    optimizer: dict
    scheduler: dict
    model: dict[str, torch.Tensor]
    records: dict[int, dict] = field(default_factory=dict)  # step → what this process logged
    fsdp_units: list[str] = field(default_factory=list)  # names of the modules fully_shard wrapped ("" = the model)
    # "float32 modules" (those in _keep_in_fp32_modules_strict) / "other modules" → the dtypes of their own parameters
    # whenever they (or a submodule) ran, i.e. as the computation saw them, not as stored
    compute_dtypes: dict[str, set[torch.dtype]] = field(default_factory=lambda: defaultdict(set))

    @property
    def step(self) -> int:
        return self.state["step"]

    def losses(self) -> dict[int, float]:
        return {step: r["loss"] for step, r in self.records.items() if "loss" in r}


def record_training_runs(monkeypatch, script) -> list[TrainingRun]:
    """Wrap ``script.train_loop`` so that every run appends a ``TrainingRun``; returns that list."""
    runs: list[TrainingRun] = []
    real_train_loop = script.train_loop

    def train_loop(accelerator, model, optimizer, scheduler, train_loader, loss_fn, state, *, logger, **kwargs):
        model_state, optimizer_state = full_state(accelerator, model, optimizer)
        run = TrainingRun(state=dict(state.state_dict()), optimizer=optimizer_state,
                          scheduler=copy.deepcopy(scheduler.state_dict()), model=model_state)  # fmt: skip
        runs.append(run)
        record_computation(run, accelerator.unwrap_model(model))
        real_log = logger.log

        def log(metrics: dict, step: int) -> None:
            run.records[step] = dict(metrics)
            real_log(metrics, step)

        monkeypatch.setattr(logger, "log", log)
        return real_train_loop(accelerator, model, optimizer, scheduler, train_loader, loss_fn, state, logger=logger,
                               **kwargs)  # fmt: skip

    monkeypatch.setattr(script, "train_loop", train_loop)
    return runs


def full_state(accelerator, model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Copies of the model's and the optimiser's state as accelerate's checkpoint stores them: under FSDP2 gathered from
    every process's shards (collective) and keyed by parameter name, as ``torch.distributed.checkpoint`` saves them.

    An optimiser without state (a fresh start) is copied as it is: ``get_optimizer_state_dict`` would first create
    its state with a zero-gradient ``step()``, which gives AdamW a step count and changes the run's updates."""
    if not getattr(accelerator, "is_fsdp2", False):  # (absent before accelerate 1.6)
        model_state = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        return model_state, copy.deepcopy(optimizer.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = copy.deepcopy(get_model_state_dict(model, options=options))  # on CPU, some tensors are the live ones
    if not optimizer.optimizer.state:
        return model_state, copy.deepcopy(optimizer.state_dict())
    return model_state, copy.deepcopy(get_optimizer_state_dict(model, optimizer.optimizer, options=options))


def record_computation(run: TrainingRun, model: torch.nn.Module) -> None:
    """Fill ``run.fsdp_units``, and hook every module to add its own parameters' dtypes to ``run.compute_dtypes``
    when it runs. A hyper-connection computes through ``read``/``write`` (not ``forward``): its dtypes are taken when
    its submodules (the mixer) run, inside ``read``, where FSDP has gathered its parameters."""
    from torch.distributed.fsdp import FSDPModule

    from training.common import float32_modules

    run.fsdp_units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    owner = {sub: module for module in float32_modules(model) for sub in module.modules()}

    def hook(module, args):
        if module in owner:
            run.compute_dtypes["float32 modules"].update(p.dtype for p in owner[module].parameters(recurse=False))
        else:
            run.compute_dtypes["other modules"].update(p.dtype for p in module.parameters(recurse=False))

    for module in model.modules():
        module.register_forward_pre_hook(hook)


def saved_model_and_optimizer(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights and the optimiser state ``checkpoint`` holds: accelerate's files, or its FSDP sharded directories
    merged into one state each (``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``)."""
    if (checkpoint / f"{FSDP_MODEL_NAME}_0").is_dir():
        model, optimizer = checkpoint / f"{FSDP_MODEL_NAME}_0", checkpoint / f"{OPTIMIZER_NAME}_0"
        return read_sharded(model)["model"], read_sharded(optimizer)["optimizer"]
    optimizer = torch.load(checkpoint / f"{OPTIMIZER_NAME}.bin", weights_only=True)
    return load_file(checkpoint / SAFE_WEIGHTS_NAME), optimizer


def read_sharded(directory: Path) -> dict:
    """A ``torch.distributed.checkpoint`` directory as one state dict (what ``accelerate merge-weights`` reads)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        dcp_to_torch_save(directory, Path(scratch) / "merged.pt")
        return torch.load(Path(scratch) / "merged.pt", weights_only=True)


def assert_resumed_from(run: TrainingRun, checkpoint: Path) -> None:
    """The run started from exactly what ``checkpoint`` holds: counters, optimiser, scheduler and weights."""
    saved_state = torch.load(checkpoint / TRAIN_STATE_FILE, weights_only=True)
    assert run.state == saved_state, f"the loop started with {run.state}; {checkpoint.name} holds {saved_state}"
    assert run.step == int(checkpoint.name.rsplit("-", 1)[1])

    saved_weights, saved_optimizer = saved_model_and_optimizer(checkpoint)
    assert run.optimizer["param_groups"] == saved_optimizer["param_groups"]
    assert saved_optimizer["state"], f"{checkpoint.name} holds no AdamW moments"
    assert run.optimizer["state"].keys() == saved_optimizer["state"].keys(), "the optimiser's moments were not restored"
    torch.testing.assert_close(run.optimizer["state"], saved_optimizer["state"], rtol=0, atol=0)

    saved_scheduler = torch.load(checkpoint / f"{SCHEDULER_NAME}.bin", weights_only=True)
    assert run.scheduler == saved_scheduler, f"the loop started with scheduler {run.scheduler}, saved {saved_scheduler}"
    assert saved_scheduler["last_epoch"] == run.step

    assert saved_weights.keys() <= run.model.keys()
    torch.testing.assert_close({k: run.model[k] for k in saved_weights}, saved_weights, rtol=0, atol=0)


def assert_started_fresh(run: TrainingRun) -> None:
    """The run began at step 0 with an untouched optimiser (what a resume that loads nothing looks like)."""
    assert run.step == 0 and not run.optimizer["state"] and run.scheduler["last_epoch"] == 0


def assert_same_losses(run: TrainingRun, expected: dict[int, float]) -> None:
    """The run logged ``expected``'s losses at every step it logged (to ``CURVE_TOLERANCE``)."""
    losses = run.losses()
    assert losses, "the run logged no loss"
    worst = max(abs(loss - expected[step]) for step, loss in losses.items())
    assert worst <= CURVE_TOLERANCE, f"largest loss difference {worst:.3g} > {CURVE_TOLERANCE}"


def assert_not_a_resume(control: TrainingRun, resumed: TrainingRun) -> None:
    """The control (the checkpoint removed) does not reproduce the resumed run's first two losses: a ``--resume`` that
    restarted would log the control's losses, which the curve comparison then rejects."""
    assert_started_fresh(control)
    fresh, continued = list(control.losses().values())[:2], list(resumed.losses().values())[:2]
    assert len(fresh) == len(continued) == 2
    assert all(abs(a - b) > 100 * CURVE_TOLERANCE for a, b in zip(fresh, continued)), (fresh, continued)


def pause_inside_save_state(directory_name: str) -> None:
    """Make ``accelerator.save_state`` stop (print, then sleep) when it reaches the TrainState of ``directory_name``."""
    import accelerate.accelerator

    real_save_custom_state = accelerate.accelerator.save_custom_state

    def save_custom_state(obj, path, *args, **kwargs):
        if Path(path).name == directory_name:
            print(PAUSED_IN_SAVE, path, flush=True)
            time.sleep(600)
        return real_save_custom_state(obj, path, *args, **kwargs)

    accelerate.accelerator.save_custom_state = save_custom_state


def main(argv: list[str]) -> None:
    options = {}
    while argv[0].startswith("--"):
        key, _, value = argv.pop(0).removeprefix("--").partition("=")
        options[key] = value
    module, *script_argv = argv
    script = importlib.import_module(module)
    if "pause-in" in options:
        pause_inside_save_state(options["pause-in"])
    if "record" not in options:
        script.main(script_argv)
        return
    import pytest

    with pytest.MonkeyPatch.context() as monkeypatch:
        runs = record_training_runs(monkeypatch, script)
        script.main(script_argv)
    from accelerate import PartialState

    if PartialState().is_main_process:
        for run in runs:
            run.compute_dtypes = dict(run.compute_dtypes)  # picklable
        torch.save(runs, options["record"])


if __name__ == "__main__":
    from tests.resume import main  # this module under its own name: the runs it saves unpickle as tests.resume's

    main(sys.argv[1:])
