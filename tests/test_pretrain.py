"""training/pretrain.py and training/common.py: an end-to-end run, exact resume (checked against the checkpoint's
files, with a control that restarts), kill -9 after a checkpoint and during a save, DDP = 1 process, the offline
text pipeline, and the errors a user can hit.

The checks that start child processes (the two kills, 2-process DDP) are ``slow``:
``pytest -m slow tests/test_pretrain.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from accelerate.utils.constants import SAFE_WEIGHTS_NAME

from hf_jpmhc.data.text import build_lm_datasets, byte_tokenizer, load_text_dataset, load_tokenizer, strip_gutenberg
from tests.resume import (
    CURVE_TOLERANCE,
    PAUSED_IN_SAVE,
    TrainingRun,
    assert_not_a_resume,
    assert_resumed_from,
    assert_same_losses,
    record_training_runs,
)
from tests.conftest import assert_ordinary_permissions
from training import pretrain
from training.common import CHECKPOINT_PREFIX, read_jsonl

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_position_embeddings": 64, "num_streams": 4, "mixer": "stiefel"}  # fmt: skip
MAX_STEPS = 12


def run_args(output_dir: Path, model_json: Path, **overrides) -> list[str]:
    """A tiny byte-level run on the offline Shakespeare data: 12 updates of 4 × 32 tokens."""
    settings = dict(output_dir=output_dir, model=model_json, tokenizer="byte", block_size=32, batch_size=4,
                    max_steps=MAX_STEPS, warmup_steps=2, learning_rate=1e-2, log_every=1, eval_every=6,
                    eval_blocks=16, save_every=3, save_total_limit=2, seed=1)  # fmt: skip
    settings.update(overrides)
    return [f"--{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def model_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.json"
    path.write_text(json.dumps(TINY_MODEL))
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_json) -> tuple[Path, dict]:
    """One uninterrupted run, in this process: the reference curve for the resume and DDP checks."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    metrics = pretrain.main(run_args(output_dir, model_json))
    return output_dir, metrics


def curve(output_dir: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_jsonl(output_dir / "logs" / "metrics.jsonl") if key in r}


def test_end_to_end_run_saves_a_hub_ready_checkpoint(uninterrupted):
    output_dir, metrics = uninterrupted
    losses = curve(output_dir)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert losses[MAX_STEPS] < losses[1] - 1.0  # byte-level Shakespeare: ~5.6 nats at init, ~3.5 after 12 steps
    assert sorted(curve(output_dir, "val_loss")) == [6, 12]
    # every logged step carries its cost and the H dynamics, aggregated and per site (2 layers: 4 sites)
    record = read_jsonl(output_dir / "logs" / "metrics.jsonl")[-1]
    assert record["step_seconds"] > 0 and record["step_cpu_seconds"] > 0 and record["monitor_seconds"] > 0
    assert 0 < record["hc/h_dist_init"] and record["hc/amax"] >= 1.0 and record["hc/orth_residual"] < 1e-5  # Stiefel
    assert {k.split("/")[1] for k in record if k.count("/") == 2} == {"0.attn_hc", "0.mlp_hc", "1.attn_hc", "1.mlp_hc"}

    final = output_dir / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_jpmhc.JPmHCForCausalLM"
    for name in ("modeling_jpmhc.py", "mixers.py", "model.safetensors", "tokenizer.json", "README.md"):
        assert (final / name).is_file(), name
    card = (final / "README.md").read_text()
    assert "## Training" in card and f"{MAX_STEPS} / " in card and "perplexity" in card
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-9"]
    for path in output_dir.iterdir():  # 0644 / 0755, not safetensors' 0600, in final/ and checkpoints/
        assert_ordinary_permissions(path)

    # The saved model and tokenizer reproduce the logged validation loss.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    val = build_lm_datasets("shakespeare", tokenizer, 32, seed=1).with_format("torch")["validation"]
    blocks = val[:16]["input_ids"]
    loss = pretrain.block_losses(model, blocks).mean().item()
    assert loss == pytest.approx(metrics["val_loss"], abs=1e-5)


def test_resume_starts_from_the_checkpoint_state(uninterrupted, model_json, tmp_path, monkeypatch):
    """``--resume`` after a scheduled stop: the process starts at the newest checkpoint's step with its optimiser,
    scheduler and weights, and computes the uninterrupted run's remaining losses. The control — the same command
    with the checkpoints removed — starts over at step 0 and does not reproduce the resumed run's first losses."""
    reference, _ = uninterrupted
    runs = record_training_runs(monkeypatch, pretrain)
    args = run_args(tmp_path / "run", model_json)
    pretrain.main([*args, "--stop_after=4"])  # checkpoints 3 (save_every) and 4 (the stop)
    checkpoint = snapshot(tmp_path / "run" / "checkpoints" / "checkpoint-4", tmp_path / "snapshot")
    shutil.copytree(tmp_path / "run", tmp_path / "control")
    shutil.rmtree(tmp_path / "control" / "checkpoints")

    pretrain.main([*args, "--resume"])
    resumed = runs[-1]
    assert_resumed_from(resumed, checkpoint)
    assert_continues_the_reference(resumed, tmp_path / "run", reference, resumed_at=4)

    pretrain.main([*run_args(tmp_path / "control", model_json), "--resume", "--stop_after=2"])
    assert_not_a_resume(runs[-1], resumed)


def snapshot(checkpoint: Path, target: Path) -> Path:
    """A copy of ``checkpoint`` under its own name (the resumed run prunes old checkpoints)."""
    return Path(shutil.copytree(checkpoint, target / checkpoint.name))


def assert_continues_the_reference(run: TrainingRun, output_dir: Path, reference: Path, *, resumed_at: int) -> None:
    """The resumed process logged exactly the steps after ``resumed_at``, with the uninterrupted run's losses, and the
    run's metrics.jsonl reads as the uninterrupted run's."""
    expected = curve(reference)
    assert sorted(run.losses()) == list(range(resumed_at + 1, MAX_STEPS + 1))
    assert_same_losses(run, expected)
    merged = curve(output_dir)
    assert sorted(merged) == sorted(expected)
    assert max(abs(merged[s] - expected[s]) for s in expected) <= CURVE_TOLERANCE
    assert curve(output_dir, "val_loss") == pytest.approx(curve(reference, "val_loss"), abs=CURVE_TOLERANCE)


def start_run(args: list[str], log: Path, *, pause_in_save_of: str = "") -> subprocess.Popen:
    """``training/pretrain.py ARGS`` in a child process, stdout piped, stderr to ``log``; with ``pause_in_save_of``, the
    child waits inside ``save_state`` of that checkpoint directory (``tests/resume.py``)."""
    if pause_in_save_of:
        command = [sys.executable, "-m", "tests.resume", f"--pause-in={pause_in_save_of}", "training.pretrain", *args]
    else:
        command = [sys.executable, "training/pretrain.py", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with log.open("w") as stderr:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)


def kill_when(process: subprocess.Popen, marker: str, log: Path, *, kill: Callable[[], None] | None = None) -> str:
    """SIGKILL ``process`` (or call ``kill``) as soon as it prints a line containing ``marker``; returns that line."""
    line = ""
    for line in process.stdout:
        if marker in line:
            if kill is None:
                process.send_signal(signal.SIGKILL)
            else:
                kill()
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it printed {marker!r}:\n{log.read_text()[-3000:]}"
    return line


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_curve(uninterrupted, model_json, tmp_path, monkeypatch):
    """kill -9 right after the first checkpoint is announced; --resume continues from the newest checkpoint."""
    reference, _ = uninterrupted
    args, log = run_args(tmp_path / "run", model_json), tmp_path / "stderr.txt"
    kill_when(start_run(args, log), "saved checkpoint", log)
    assert max(curve(tmp_path / "run")) < MAX_STEPS and not (tmp_path / "run" / "final").exists()
    newest = max((tmp_path / "run" / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"),
                 key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))  # fmt: skip
    checkpoint = snapshot(newest, tmp_path / "snapshot")

    runs = record_training_runs(monkeypatch, pretrain)
    pretrain.main([*args, "--resume"])
    assert_resumed_from(runs[-1], checkpoint)
    assert_continues_the_reference(runs[-1], tmp_path / "run", reference, resumed_at=runs[-1].step)


@pytest.mark.slow
def test_kill_during_a_save_resumes_from_the_previous_checkpoint(uninterrupted, model_json, tmp_path, monkeypatch):
    """kill -9 inside ``save_state`` of step 6: the half-written ``.tmp-checkpoint-6`` is removed on resume and the
    run continues from checkpoint-3, reproducing the uninterrupted curve."""
    reference, _ = uninterrupted
    args, log = run_args(tmp_path / "run", model_json), tmp_path / "stderr.txt"
    line = kill_when(start_run(args, log, pause_in_save_of=".tmp-checkpoint-6"), PAUSED_IN_SAVE, log)
    checkpoints = tmp_path / "run" / "checkpoints"
    partial = checkpoints / ".tmp-checkpoint-6"
    assert str(partial) in line and (partial / SAFE_WEIGHTS_NAME).is_file() and (partial / "optimizer.bin").is_file()
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-checkpoint-6", "checkpoint-3"]
    checkpoint = snapshot(checkpoints / "checkpoint-3", tmp_path / "snapshot")

    runs = record_training_runs(monkeypatch, pretrain)
    pretrain.main([*args, "--resume", "--stop_after=5"])  # stop before step 6 is saved again
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-5"]
    assert_resumed_from(runs[-1], checkpoint)
    pretrain.main([*args, "--resume"])
    assert runs[-1].step == 5
    assert_continues_the_reference(runs[-1], tmp_path / "run", reference, resumed_at=5)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(uninterrupted, model_json, tmp_path):
    """Same global batch (4 sequences: 2 per process), same seed: the curves agree to float32 reduction order."""
    reference, _ = uninterrupted
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "training/configs/ddp_cpu.yaml",
           "--main_process_port", str(port), "training/pretrain.py", *run_args(tmp_path, model_json)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    ddp, single = curve(tmp_path), curve(reference)
    assert sorted(ddp) == sorted(single)
    # Tolerance: DDP averages two half-batch gradients; summation order differs from one process by ~1e-7
    # relative per step, which AdamW can amplify slightly over 12 steps.
    assert max(abs(ddp[s] - single[s]) for s in single) <= 1e-4


# ----------------------------------------------------------------------------------------------------
# data and errors
# ----------------------------------------------------------------------------------------------------


def test_gutenberg_framing_is_stripped():
    text = ("The Project Gutenberg EBook of Hamlet\nlicence...\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
            "To be, or not to be\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n")  # fmt: skip
    assert strip_gutenberg(text) == "To be, or not to be\n"
    plays = load_text_dataset("shakespeare")["text"]
    assert len(plays) == 42 and not any("Gutenberg" in play for play in plays)
    assert any("To be, or not to be" in play for play in plays)


def test_byte_tokenizer_round_trips_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = byte_tokenizer()
    text = "O Romeo, Romeo! — wherefore art thou? 🌹"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8")) and tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False)["input_ids"] == ids


def test_local_jsonl_with_a_named_text_column(tmp_path):
    rows = [{"id": i, "body": f"document {i} " * 40} for i in range(6)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_lm_datasets(str(tmp_path / "docs.jsonl"), byte_tokenizer(), 16, text_column="body", val_fraction=0.1)
    assert data["train"][0]["input_ids"].__len__() == 16
    total = sum(len(r["body"].encode()) + 1 for r in rows)
    assert len(data["train"]) + len(data["validation"]) == total // 16
    with pytest.raises(ValueError, match=r"text_column='text' is not a column .*\['id', 'body'\]"):
        load_text_dataset(str(tmp_path / "docs.jsonl"))


def refused(argv: list[str], capsys) -> str:
    """The one-line message ``pretrain.main(argv)`` exits with (status 2: bad input)."""
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


def test_block_size_above_max_position_embeddings_is_refused(model_json, tmp_path, capsys):
    message = refused(run_args(tmp_path / "run", model_json, block_size=128), capsys)
    assert message.startswith("pretrain.py: error: block_size=128 exceeds the model's max_position_embeddings=64")
    assert not (tmp_path / "run").exists()


def test_missing_tokenizer_is_refused(model_json, tmp_path, capsys):
    with pytest.raises(ValueError, match="tokenizer='/no/such/tokenizer' could not be loaded"):
        load_tokenizer("/no/such/tokenizer")
    message = refused(run_args(tmp_path / "run", model_json, tokenizer="/no/such/tokenizer"), capsys)
    assert "tokenizer='/no/such/tokenizer' could not be loaded" in message
    assert not (tmp_path / "run").exists()


def test_unknown_yaml_key_and_preset_are_refused(tmp_path):
    (tmp_path / "bad.yaml").write_text("max_step: 10\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['max_step'\]"):
        pretrain.parse_config(["--config", str(tmp_path / "bad.yaml")])
    config = pretrain.parse_config(["--model", "jpmhc-huge"])
    with pytest.raises(ValueError, match="model='jpmhc-huge' is neither a preset .*jpmhc-tiny"):
        pretrain.model_config_from(config, 257, byte_tokenizer())


def test_llama_architecture_is_the_preset_without_hyper_connections(model_json):
    from transformers import LlamaForCausalLM

    from training.common import hyper_connection_parameters

    tokenizer = byte_tokenizer()
    llama, _ = pretrain.build_model(pretrain.parse_config(["--model", str(model_json), "--architecture", "llama"]), tokenizer)
    jpmhc, _ = pretrain.build_model(pretrain.parse_config(["--model", str(model_json)]), tokenizer)
    assert type(llama) is LlamaForCausalLM and llama.config.num_hidden_layers == jpmhc.config.num_hidden_layers == 2
    hc = sum(p.numel() for p in hyper_connection_parameters(jpmhc))
    assert llama.num_parameters() == jpmhc.num_parameters() - hc > 0
    with pytest.raises(ValueError, match="architecture='llama' is the plain baseline: drop init_from, mixer and num_streams"):
        pretrain.parse_config(["--architecture", "llama", "--mixer", "sinkhorn"])
    with pytest.raises(ValueError, match="hc_lr_scale must be a positive number"):
        pretrain.parse_config(["--hc_lr_scale", "0"])


def test_presets_build_with_mixer_overrides():
    config = pretrain.parse_config(["--config", str(REPO / "training/configs/demo.yaml"), "--mixer", "mhc", "--num_streams", "2",
                                    "--kernel_backend", "compiled"])  # fmt: skip
    model_config = pretrain.model_config_from(config, 257, byte_tokenizer())
    assert (model_config.mixer, model_config.num_streams, model_config.vocab_size) == ("sinkhorn", 2, 257)
    assert model_config.kernel_backend == "compiled"
    assert config.output_dir == "runs/demo" and config.tokenizer == "smollm2"
