"""FSDP2 through Accelerate on two CPU processes (gloo): ``accelerate launch --config_file
training/configs/fsdp_cpu.yaml`` with ``training/pretrain.py`` and ``training/finetune_vision.py``.

Each launched process runs the script under ``tests/resume.py``'s recorder, which saves what the main process held:
the FSDP units, the state the training loop started from (gathered from the shards) and the parameter dtypes each
module computed with. The checks:

* 2 processes = 1 process at the same global batch, loss curves within 1e-4 over 12 steps (stiefel, sinkhorn, and a
  JPmHC-ViT), one unit per decoder / ViT layer and one float32 unit per hyper-connection;
* kill -9 of the whole launch after a checkpoint; ``--resume`` starts from the sharded checkpoint's step, optimiser,
  scheduler and weights and reproduces the uninterrupted FSDP curve;
* bf16 mixed precision: decoder weights compute in bf16, the hyper-connections in float32, and the loss is finite;
* the consolidated ``final/`` equals the merged sharded checkpoint of the last step, loads with the Auto class and
  as remote code without hf_jpmhc, and generates the same tokens.

The tests that launch 2-process runs (20–60 s each on the shared 2-core machine) are ``slow``; the launch settings
the scripts refuse are checked in this process.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import compare_versions
from safetensors.torch import load_file

from tests.resume import TrainingRun, assert_resumed_from, read_sharded
from tests.test_pretrain import MAX_STEPS, REPO, assert_continues_the_reference, curve, kill_when, run_args, snapshot
from tests.test_pretrain import model_json, uninterrupted  # noqa: F401  (fixtures: the 1-process stiefel run)
from training import pretrain
from training.common import CHECKPOINT_PREFIX, FSDP_MIN_ACCELERATE

FSDP_CPU = "training/configs/fsdp_cpu.yaml"
# Loss curves of 2 and 1 processes: gradients are reduce-scattered in float32 in another summation order (~1e-7
# relative per step), which AdamW can amplify slightly over 12 steps (as for DDP, tests/test_pretrain.py).
PROCESS_COUNT_TOLERANCE = 1e-4


def launches(test):
    """The mark of a test that launches 2-process FSDP runs: slow, and skipped where the scripts refuse FSDP."""
    needs = pytest.mark.skipif(compare_versions("accelerate", "<", FSDP_MIN_ACCELERATE),
                               reason=f"training/ refuses FSDP before accelerate {FSDP_MIN_ACCELERATE}")  # fmt: skip
    return pytest.mark.slow(needs(test))


def launch_command(module: str, args: list[str], *, record: Path | None = None) -> list[str]:
    """``accelerate launch`` of ``python -m tests.resume [--record=FILE] MODULE ARGS`` with the FSDP CPU config."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recorder = [f"--record={record}"] if record is not None else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CPU, "--main_process_port",
            str(port), "-m", "tests.resume", *recorder, module, *args]  # fmt: skip


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip


def launch(module: str, args: list[str], record: Path) -> list[TrainingRun]:
    """Run ``module`` under FSDP on 2 processes to the end; the runs its main process recorded."""
    result = subprocess.run(launch_command(module, args, record=record), cwd=REPO, env=child_env(), capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    assert "2 process(es)" in result.stdout
    return torch.load(record, weights_only=False)


def fsdp_run(tmp_path_factory, model_json: Path, name: str, *overrides: str) -> tuple[Path, TrainingRun]:
    output_dir = tmp_path_factory.mktemp(name)
    runs = launch("training.pretrain", [*run_args(output_dir / "run", model_json), *overrides], output_dir / "runs.pt")
    return output_dir / "run", runs[-1]


@pytest.fixture(scope="module")
def fsdp_stiefel(tmp_path_factory, model_json) -> tuple[Path, TrainingRun]:
    """The uninterrupted FSDP run of the stiefel model (the 1-process one is test_pretrain's ``uninterrupted``)."""
    return fsdp_run(tmp_path_factory, model_json, "fsdp_stiefel")


def assert_sharded_per_layer(run: TrainingRun, layers: str, num_layers: int) -> None:
    """One FSDP unit per layer ``{layers}.i`` and one per hyper-connection in it; the model is the root unit."""
    units = set(run.fsdp_units)
    assert "" in units
    assert {name for name in units if name.startswith(f"{layers}.")} == {
        f"{layers}.{i}{site}" for i in range(num_layers) for site in ("", ".attn_hc", ".mlp_hc")
    }, sorted(units)


def assert_same_curve(actual: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(actual) == sorted(expected)
    worst = max(abs(actual[s] - expected[s]) for s in expected)
    assert worst <= PROCESS_COUNT_TOLERANCE, f"largest loss difference {worst:.3g} > {PROCESS_COUNT_TOLERANCE}"


# ----------------------------------------------------------------------------------------------------
# 2 processes = 1 process
# ----------------------------------------------------------------------------------------------------


@launches
def test_fsdp_stiefel_matches_one_process(fsdp_stiefel, uninterrupted):
    """Also the H dynamics logged at every step (``hf_jpmhc.diagnostics.dynamics``, which reads each hyper-connection's
    parameters after its read: ``training.common.float32_units_gathered``)."""
    output_dir, run = fsdp_stiefel
    assert len(curve(output_dir)) == MAX_STEPS
    assert_same_curve(curve(output_dir), curve(uninterrupted[0]))
    for metric in ("hc/h_dist_init", "hc/h_norm", "hc/orth_residual", "hc/alpha_res", "hc/amax"):
        assert_same_curve(curve(output_dir, metric), curve(uninterrupted[0], metric))
    assert_sharded_per_layer(run, "model.layers", num_layers=2)
    assert "model.stream_collapse" in run.fsdp_units
    checkpoint = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{MAX_STEPS}"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()  # sharded


@launches
def test_fsdp_sinkhorn_matches_one_process(tmp_path_factory, model_json, tmp_path):
    output_dir, run = fsdp_run(tmp_path_factory, model_json, "fsdp_sinkhorn", "--mixer=sinkhorn")
    pretrain.main([*run_args(tmp_path / "single", model_json), "--mixer=sinkhorn"])
    assert_same_curve(curve(output_dir), curve(tmp_path / "single"))
    assert_sharded_per_layer(run, "model.layers", num_layers=2)


@launches
def test_fsdp_vision_matches_one_process(tmp_path):
    """finetune_vision.py: a JPmHC-ViT sharded per ``JPmHCViTLayer``, 4 steps, the curve of 1 process."""
    from tests.test_vit import TINY_FINETUNE, finetune_main

    def args(name: str) -> list[str]:
        return [f"--output_dir={tmp_path / name}", "--max_steps=4", "--save_every=4", *TINY_FINETUNE]

    runs = launch("training.finetune_vision", args("fsdp"), tmp_path / "runs.pt")
    finetune_main()(args("single"))
    assert_same_curve(curve(tmp_path / "fsdp"), curve(tmp_path / "single"))
    assert_sharded_per_layer(runs[-1], "vit.layers", num_layers=2)
    fsdp, single = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("fsdp", "single"))
    assert fsdp["test_loss"] == pytest.approx(single["test_loss"], abs=PROCESS_COUNT_TOLERANCE)


# ----------------------------------------------------------------------------------------------------
# kill -9 and resume
# ----------------------------------------------------------------------------------------------------


def kill_tree(pid: int) -> None:
    """SIGKILL process ``pid`` and all its descendants at once: the launcher, torchrun's agent and the workers (which
    torchrun starts in sessions of their own, out of reach of a process-group kill)."""
    import psutil

    root = psutil.Process(pid)
    for process in [*root.children(recursive=True), root]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


@launches
def test_kill_and_resume_under_fsdp(fsdp_stiefel, model_json, tmp_path):
    """SIGKILL to the whole launch (launcher and both workers) as soon as a checkpoint is announced; ``--resume``
    on 2 processes starts from the newest sharded checkpoint — step, AdamW moments, scheduler, weights — and logs
    the uninterrupted FSDP run's remaining losses."""
    reference, _ = fsdp_stiefel
    args, log = run_args(tmp_path / "run", model_json), tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        process = subprocess.Popen(launch_command("training.pretrain", args), cwd=REPO, env=child_env(),
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)  # fmt: skip
    kill_when(process, "saved checkpoint", log, kill=lambda: kill_tree(process.pid))
    assert max(curve(tmp_path / "run")) < MAX_STEPS and not (tmp_path / "run" / "final").exists()
    newest = max((tmp_path / "run" / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"),
                 key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))  # fmt: skip
    checkpoint = snapshot(newest, tmp_path / "snapshot")

    runs = launch("training.pretrain", [*args, "--resume"], tmp_path / "runs.pt")
    assert_resumed_from(runs[-1], checkpoint)
    assert_continues_the_reference(runs[-1], tmp_path / "run", reference, resumed_at=runs[-1].step)


# ----------------------------------------------------------------------------------------------------
# bf16 mixed precision
# ----------------------------------------------------------------------------------------------------


@launches
def test_bf16_keeps_hyper_connections_in_float32(tmp_path_factory, model_json):
    """``--mixed_precision bf16``: FSDP's policy gathers the decoder weights in bf16, while the hyper-connections and
    the stream collapse compute with float32 parameters (as after ``from_pretrained(dtype=bfloat16)``)."""
    output_dir, run = fsdp_run(tmp_path_factory, model_json, "fsdp_bf16", "--mixed_precision=bf16", "--max_steps=4",
                               "--eval_every=4", "--save_every=4")  # fmt: skip
    assert run.compute_dtypes["float32 modules"] == {torch.float32}
    assert run.compute_dtypes["other modules"] == {torch.bfloat16}
    losses = curve(output_dir)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(loss) for loss in losses.values())
    assert math.isfinite(curve(output_dir, "val_loss")[4])
    saved = load_file(output_dir / "final" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}  # master weights


# ----------------------------------------------------------------------------------------------------
# the consolidated checkpoint
# ----------------------------------------------------------------------------------------------------

REMOTE_CODE_CHILD = """
import sys, torch
sys.modules["hf_jpmhc"] = None  # importing hf_jpmhc now fails: only the checkpoint's own code is available
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids = torch.load(sys.argv[2])
torch.save(model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False), sys.argv[3])
"""


@launches
def test_final_checkpoint_is_the_unsharded_model(fsdp_stiefel, tmp_path):
    """``final/`` holds exactly the weights of the last sharded checkpoint merged into one state dict, with the
    model's own code (not torch's FSDP classes); it loads with ``AutoModelForCausalLM`` here and as remote code
    where hf_jpmhc cannot be imported, and all three generate the same tokens."""
    from transformers import AutoModelForCausalLM

    from hf_jpmhc import JPmHCForCausalLM

    output_dir, _ = fsdp_stiefel
    final = output_dir / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_jpmhc.JPmHCForCausalLM"
    assert config["architectures"] == ["JPmHCForCausalLM"]
    assert not list(final.glob("_fsdp*.py"))
    card = (final / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "FSDP" not in card and "| 2 × cpu /" in card

    last = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{MAX_STEPS}"
    merged = read_sharded(last / "pytorch_model_fsdp_0")["model"]
    saved = load_file(final / "model.safetensors")
    tied = {k for k in merged if k not in saved}
    assert tied <= {"lm_head.weight"} and merged.keys() - tied == saved.keys()
    torch.testing.assert_close(saved, {k: merged[k] for k in saved}, rtol=0, atol=0)

    loaded = AutoModelForCausalLM.from_pretrained(final).eval()
    unsharded = JPmHCForCausalLM(loaded.config).eval()
    unsharded.load_state_dict(merged, strict=True)
    ids = torch.tensor([list(b"To be, or not")])
    generate = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    tokens = unsharded.generate(ids, **generate)
    assert torch.equal(loaded.generate(ids, **generate), tokens)

    torch.save(ids, tmp_path / "ids.pt")
    result = subprocess.run([sys.executable, "-c", REMOTE_CODE_CHILD, str(final), str(tmp_path / "ids.pt"),
                             str(tmp_path / "tokens.pt")], cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "tokens.pt"), tokens)


# ----------------------------------------------------------------------------------------------------
# launch settings the scripts refuse
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"FSDP_VERSION": "1"}, "the accelerate config selects FSDP version 1; training/ shards with FSDP2 only: set "
                                "fsdp_version: 2 in its fsdp_config"),
        ({"FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"},
         "the accelerate config sets fsdp_cpu_ram_efficient_loading (true unless set); set it to false: every process "
         "builds the model, and its float32 units are sharded before Accelerate's"),
        ({"FSDP_VERSION": "2", "minimum accelerate": "99.0"},
         "FSDP needs accelerate >= 99.0 (older versions resume FSDP2 with fresh optimizer moments): pip install -U "
         "accelerate"),
    ],
    ids=["fsdp1", "cpu-ram-efficient-loading", "old-accelerate"],
)  # fmt: skip
def test_unsupported_fsdp_launches_are_refused(environment, message, model_json, tmp_path, capsys, monkeypatch):
    """What ``accelerate launch`` sets for such a config (ACCELERATE_USE_FSDP, FSDP_*): one line, exit status 2, and
    nothing written — before Accelerate would build its state (FSDP1's plugin raises a RuntimeError on CPU)."""
    from tests.test_pretrain import refused
    from training import common

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in environment.items():
        if key == "minimum accelerate":
            monkeypatch.setattr(common, "FSDP_MIN_ACCELERATE", value)
        else:
            monkeypatch.setenv(key, value)
    assert refused(run_args(tmp_path / "run", model_json), capsys) == f"pretrain.py: error: {message}"
    assert not (tmp_path / "run").exists()
