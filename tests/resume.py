"""What a resumed training run holds, checked against the checkpoint accelerate wrote (shared by the scripts' tests).

``record_training_runs(monkeypatch, script)`` wraps the script's ``train_loop`` (the real one still runs) and
records, for every run the script starts, what the process holds when its training loop begins — the
``TrainState`` counters, the optimiser, scheduler and model state — and the records that process itself logs.
``assert_resumed_from(run, checkpoint)`` compares that state with the files of ``checkpoint``: a ``--resume``
that loaded nothing would start at step 0 with fresh AdamW moments and fail here, even when the run's curve
(same seed, same data order) reproduces the uninterrupted one.

``python -m tests.resume MODULE PAUSE_IN ARGS...`` runs ``MODULE.main(ARGS)`` in a child process that stops inside
``accelerator.save_state`` while writing the directory named ``PAUSE_IN`` — after the model, optimiser, scheduler
and RNG files, before the ``TrainState`` — prints ``PAUSED_IN_SAVE`` and the path, and waits there to be killed.
"""

from __future__ import annotations

import copy
import importlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils.constants import OPTIMIZER_NAME, SAFE_WEIGHTS_NAME, SCHEDULER_NAME
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
        run = TrainingRun(
            state=dict(state.state_dict()),
            optimizer=copy.deepcopy(optimizer.state_dict()),
            scheduler=copy.deepcopy(scheduler.state_dict()),
            model={k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()},
        )
        runs.append(run)
        real_log = logger.log

        def log(metrics: dict, step: int) -> None:
            run.records[step] = dict(metrics)
            real_log(metrics, step)

        monkeypatch.setattr(logger, "log", log)
        return real_train_loop(accelerator, model, optimizer, scheduler, train_loader, loss_fn, state, logger=logger,
                               **kwargs)  # fmt: skip

    monkeypatch.setattr(script, "train_loop", train_loop)
    return runs


def assert_resumed_from(run: TrainingRun, checkpoint: Path) -> None:
    """The run started from exactly what ``checkpoint`` holds: counters, optimiser, scheduler and weights."""
    saved_state = torch.load(checkpoint / TRAIN_STATE_FILE, weights_only=True)
    assert run.state == saved_state, f"the loop started with {run.state}; {checkpoint.name} holds {saved_state}"
    assert run.step == int(checkpoint.name.rsplit("-", 1)[1])

    saved_optimizer = torch.load(checkpoint / f"{OPTIMIZER_NAME}.bin", weights_only=True)
    assert run.optimizer["param_groups"] == saved_optimizer["param_groups"]
    assert saved_optimizer["state"], f"{checkpoint.name} holds no AdamW moments"
    assert run.optimizer["state"].keys() == saved_optimizer["state"].keys(), "the optimiser's moments were not restored"
    torch.testing.assert_close(run.optimizer["state"], saved_optimizer["state"], rtol=0, atol=0)

    saved_scheduler = torch.load(checkpoint / f"{SCHEDULER_NAME}.bin", weights_only=True)
    assert run.scheduler == saved_scheduler, f"the loop started with scheduler {run.scheduler}, saved {saved_scheduler}"
    assert saved_scheduler["last_epoch"] == run.step

    saved_weights = load_file(checkpoint / SAFE_WEIGHTS_NAME)
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


if __name__ == "__main__":
    module, pause_in, *argv = sys.argv[1:]
    pause_inside_save_state(pause_in)
    importlib.import_module(module).main(argv)
