"""Bad input at every entry point: one line ``prog: error: <what is wrong; what to do>``, exit status 2, no
traceback, and no output directory left behind — or an existing one left exactly as it was (hf_jpmhc.errors).

The bad inputs are made for real: tiny checkpoints written by ``save_pretrained`` (a Llama, a JPmHC LM, a ViT,
a JPmHC-ViT), copies of each with ``model.safetensors`` cut in half and with config.json edited (``num_streams``
4 → 2 for the JPmHC models, one more layer for the others), a directory that is not a model, a path that does
not exist and a Hub name under HF_HUB_OFFLINE=1 (set by conftest). Most cases call the entry point's ``main(argv)``
in-process; a few run it as a subprocess to show that no traceback reaches the terminal.

``python tests/entry_point_messages.py`` runs every case and prints the table of the messages.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

from hf_jpmhc import JPmHCConfig, JPmHCForCausalLM, convert_vit
from hf_jpmhc.data.checkpoints import SMOLLM2_HUB_NAME
from hf_jpmhc.data.text import byte_tokenizer
from hf_jpmhc.errors import describe, user_errors
from tests.conftest import assert_ordinary_permissions, tiny_llama_kwargs

REPO = Path(__file__).resolve().parents[1]
EVAL_FIXTURES = REPO / "tests" / "fixtures" / "eval"


# ------------------------------------------------------------------------------------------ the bad inputs


def _truncated_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return target


def _edited_copy(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


def build_bad_inputs(root: Path) -> dict[str, str]:
    """Real checkpoints and broken copies of them under ``root``: {name: path (or Hub name)}."""
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    lm = tiny_llama_kwargs(vocab_size=len(tokenizer))
    vit = ViTForImageClassification(ViTConfig(image_size=28, patch_size=7, num_channels=3, hidden_size=32, num_labels=10,
                                              num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))  # fmt: skip
    models = {
        "llama": (LlamaForCausalLM(LlamaConfig(**lm)), {"num_hidden_layers": 3}),
        "jpmhc": (JPmHCForCausalLM(JPmHCConfig(**lm, num_streams=4, mixer="stiefel")), {"num_streams": 2}),
        "vit": (vit, {"num_hidden_layers": 3}),
        "jpmhc-vit": (convert_vit(ViTForImageClassification(vit.config), num_streams=4, mixer="sinkhorn"), {"num_streams": 2}),
    }
    inputs = {}
    for name, (model, edit) in models.items():
        good = root / name
        model.save_pretrained(good)
        if isinstance(model, (LlamaForCausalLM, JPmHCForCausalLM)):
            tokenizer.save_pretrained(good)
        inputs[name] = good
        inputs[f"{name} truncated"] = _truncated_copy(good, root / f"{name}-truncated")
        inputs[f"{name} edited"] = _edited_copy(good, root / f"{name}-edited", **edit)
    not_a_model, empty = root / "not-a-model", root / "empty"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("not a checkpoint\n")
    empty.mkdir()
    inputs |= {"missing": root / "no-such-checkpoint", "hub name": SMOLLM2_HUB_NAME, "not a model": not_a_model,
               "empty": empty}
    return {name: str(value) for name, value in inputs.items()}


# ------------------------------------------------------------------------------------------ the entry points


def _hf_jpmhc(argv):
    from hf_jpmhc.cli import main

    return main(argv)


def _eval_run(argv):
    from eval.run import main

    return main(argv)


def _eval_prepare(argv):
    from eval.prepare import main

    return main(argv)


def _pretrain(argv):
    from training.pretrain import main

    return main(argv)


def _finetune_vision(argv):
    from training.finetune_vision import main

    return main(argv)


def _flag(name: str, value: str | None) -> list[str]:
    return [] if value is None else [name, value]


@dataclass(frozen=True)
class EntryPoint:
    """``main(argv)`` of a command, and its argv for a source checkpoint (or None) and an output directory."""

    main: Callable
    argv: Callable[[str | None, str], list[str]]
    command: list[str]  # how a user runs it, for the subprocess cases


ENTRY_POINTS = {
    "hf-jpmhc convert llama": EntryPoint(_hf_jpmhc, lambda src, out: ["convert", "llama", src, out, "--streams", "2"],
                                         ["hf-jpmhc"]),
    "hf-jpmhc convert vit": EntryPoint(_hf_jpmhc, lambda src, out: ["convert", "vit", src, out, "--streams", "2"],
                                       ["hf-jpmhc"]),
    "hf-jpmhc gain": EntryPoint(_hf_jpmhc, lambda src, out: ["gain", "--model", src, "--output", f"{out}/gain.png"],
                                ["hf-jpmhc"]),
    "hf-jpmhc spectrum": EntryPoint(_hf_jpmhc, lambda src, out: ["spectrum", *_flag("--model", src), "--depth", "2",
                                                                 "--hidden", "16", "--samples", "1", "--density-draws", "1",
                                                                 "--output", f"{out}/spectrum.png"], ["hf-jpmhc"]),
    "python -m eval.run": EntryPoint(_eval_run, lambda src, out: ["--model", src, "--tasks", "arc_easy", "--limit", "2",
                                                                  "--data-dir", str(EVAL_FIXTURES), "--source", "cache",
                                                                  "--output", out], [sys.executable, "-m", "eval.run"]),
    "python -m eval.prepare": EntryPoint(_eval_prepare, lambda src, out: ["--data-dir", out],
                                         [sys.executable, "-m", "eval.prepare"]),
    "training/pretrain.py": EntryPoint(_pretrain, lambda src, out: ["--output_dir", out, *_flag("--init_from", src),
                                                                    "--tokenizer", "byte", "--block_size", "32",
                                                                    "--batch_size", "4", "--max_steps", "2",
                                                                    "--warmup_steps", "0"],
                                       [sys.executable, "training/pretrain.py"]),
    "training/finetune_vision.py": EntryPoint(_finetune_vision, lambda src, out: ["--output_dir", out,
                                                                                  *_flag("--init_from", src),
                                                                                  "--dataset", "mnist_5k",
                                                                                  "--batch_size", "8", "--max_steps", "2"],
                                              [sys.executable, "training/finetune_vision.py"]),
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One bad input at one entry point: the source checkpoint (a key of ``build_bad_inputs``, or None for the entry
    point's usual input), extra arguments, and a phrase the one-line message must contain."""

    entry: str
    bad_input: str
    source: str | None
    extra: tuple[str, ...]
    expected: str

    @property
    def id(self) -> str:
        return f"{self.entry}: {self.bad_input}"

    def argv(self, inputs: dict[str, str], out: Path) -> list[str]:
        """The command line; in ``extra``, {missing} is a path that does not exist, {empty} an empty directory."""
        extra = [arg.format(missing=inputs["missing"], empty=inputs["empty"]) for arg in self.extra]
        return [*ENTRY_POINTS[self.entry].argv(inputs[self.source] if self.source else None, str(out)), *extra]


MISSING = "no such directory; pass a checkpoint directory or a Hub model name"
OFFLINE = "needs the Hugging Face Hub, which is offline (HF_HUB_OFFLINE=1)"
NOT_A_MODEL = "has no config.json, so it is not a model checkpoint"
TRUNCATED = "model.safetensors is not a readable safetensors file"
EDITED = "the weights do not match config.json"
UNKNOWN_MIXER = "mixer='birkhoff' is not a known mixer. Valid values: grassmann"

CASES = sorted([
    *(Case(entry, bad, f"{family} {kind}" if kind else family, (), expected)
      for entry, family in (("hf-jpmhc convert llama", "llama"), ("hf-jpmhc convert vit", "vit"), ("hf-jpmhc gain", "jpmhc"),
                            ("hf-jpmhc spectrum", "jpmhc"), ("python -m eval.run", "jpmhc"),
                            ("training/pretrain.py", "jpmhc"), ("training/finetune_vision.py", "jpmhc-vit"))
      for bad, kind, expected in (("truncated model.safetensors", "truncated", TRUNCATED),
                                  ("weights do not match config.json", "edited", EDITED))),
    *(Case(entry, bad, source, (), expected)
      for entry in ("hf-jpmhc convert llama", "hf-jpmhc convert vit", "hf-jpmhc gain", "python -m eval.run",
                    "training/pretrain.py", "training/finetune_vision.py")
      for bad, source, expected in (("path does not exist", "missing", MISSING), ("Hub name, Hub offline", "hub name", OFFLINE),
                                    ("directory is not a model", "not a model", NOT_A_MODEL))),
    Case("hf-jpmhc convert llama", "unknown mixer", "llama", ("--mixer", "birkhoff"), UNKNOWN_MIXER),
    Case("hf-jpmhc convert llama", "--streams 0", "llama", ("--streams", "0"), "num_streams must be an integer >= 1, got 0"),
    Case("hf-jpmhc convert llama", "kronecker with 3 streams", "llama", ("--mixer", "kromhc", "--streams", "3"),
         "mixer='kronecker' needs num_streams to be a power of 2"),
    Case("hf-jpmhc convert vit", "a Llama checkpoint", "llama", (), "model_type='llama' cannot be converted"),
    Case("hf-jpmhc convert vit", "unknown mixer", "vit", ("--mixer", "birkhoff"), UNKNOWN_MIXER),
    Case("hf-jpmhc gain", "not a JPmHC model", "llama", (), "not a JPmHC model; convert it first"),
    Case("hf-jpmhc spectrum", "unknown mixer", None, ("--mixer", "birkhoff"), UNKNOWN_MIXER),
    Case("hf-jpmhc spectrum", "--streams 0", None, ("--streams", "0"), "num_streams must be a positive integer, got 0"),
    Case("hf-jpmhc spectrum", "--samples 0", None, ("--samples", "0"), "--samples must be >= 1, got 0"),
    Case("hf-jpmhc spectrum", "--logit-std big", None, ("--logit-std", "big"), "--logit-std must be a number"),
    Case("python -m eval.run", "unknown task", "jpmhc", ("--tasks", "arc_medium"), "tasks must be a comma-separated subset"),
    Case("python -m eval.run", "--num-fewshot -1", "jpmhc", ("--num-fewshot", "-1"), "num_fewshot must be ≥ 0"),
    Case("python -m eval.run", "--limit 0 (argparse)", "jpmhc", ("--limit", "0"), "must be a positive integer, got 0"),
    Case("python -m eval.run", "no offline data", "jpmhc", ("--data-dir", "{empty}"), "Run `python -m eval.prepare --tasks arc_easy`"),
    Case("python -m eval.prepare", "unknown task", None, ("--tasks", "arc_medium"), "tasks must be a comma-separated subset"),
    Case("python -m eval.prepare", "no task", None, ("--tasks", ","), "tasks must name at least one of"),
    Case("python -m eval.prepare", "--bigbench-sdist does not exist", None, ("--tasks", "bbh", "--bigbench-sdist", "{missing}"),
         "no-such-checkpoint: no such file; pass the path of bigbench-1.0.0.tar.gz"),
    Case("training/pretrain.py", "unknown mixer", None, ("--mixer", "birkhoff"), UNKNOWN_MIXER),
    Case("training/pretrain.py", "--max_steps 0", None, ("--max_steps", "0"), "max_steps must be > 0, got 0"),
    Case("training/pretrain.py", "--log_every 0", None, ("--log_every", "0"), "log_every must be > 0, got 0"),
    Case("training/pretrain.py", "--block_size above the model's", None, ("--block_size", "4096"),
         "block_size=4096 exceeds the model's max_position_embeddings=1024"),
    Case("training/pretrain.py", "dataset does not exist", None, ("--dataset", "{missing}"),
         "is neither a local file/directory nor a loadable Hugging Face dataset"),
    Case("training/finetune_vision.py", "unknown model", None, ("--model", "resnet"), "model must be one of ('vit', 'jpmhc')"),
    Case("training/finetune_vision.py", "unknown mixer", None, ("--mixer", "birkhoff"), UNKNOWN_MIXER),
    Case("training/finetune_vision.py", "--batch_size 0", None, ("--batch_size", "0"), "batch_size must be > 0, got 0"),
    Case("training/finetune_vision.py", "dataset does not exist", None, ("--dataset", "{missing}"),
         "could not be loaded"),
], key=lambda case: list(ENTRY_POINTS).index(case.entry))  # fmt: skip


def run_case(case: Case, inputs: dict[str, str], out: Path) -> tuple[int | str | None, str]:
    """Run ``case`` in-process: (exit status, stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        ENTRY_POINTS[case.entry].main(case.argv(inputs, out))
    return exit_info.value.code, stderr.getvalue()


def error_line(entry: str, stderr: str) -> str:
    """The message of stderr's last line, which must read ``prog: error: <message>`` (prog: the command's name)."""
    prog = entry.removeprefix("training/")
    last = stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), last
    return last.removeprefix(f"{prog}: error: ")


# ------------------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    return build_bad_inputs(tmp_path_factory.mktemp("bad_inputs"))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_and_exit_status_2(case, inputs, tmp_path):
    out = tmp_path / "out"
    status, stderr = run_case(case, inputs, out)
    assert status == 2
    assert case.expected in error_line(case.entry, stderr)
    assert "Traceback" not in stderr
    assert not out.exists()


def _snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes(), p.stat().st_mode)
            for p in [root, *root.rglob("*")]}  # fmt: skip


# One case per entry point, run with its output already there (convert: with --overwrite).
EXISTING_OUTPUT = {
    "hf-jpmhc convert llama: weights do not match config.json": ("--overwrite",),
    "hf-jpmhc convert vit: truncated model.safetensors": ("--overwrite",),
    "hf-jpmhc gain: weights do not match config.json": (),
    "hf-jpmhc spectrum: unknown mixer": (),
    "python -m eval.run: weights do not match config.json": (),
    "python -m eval.prepare: --bigbench-sdist does not exist": (),
    "training/pretrain.py: weights do not match config.json": (),
    "training/finetune_vision.py: path does not exist": (),
}


@pytest.mark.parametrize("case_id", EXISTING_OUTPUT)
def test_bad_input_leaves_an_existing_output_as_it_was(case_id, inputs, tmp_path):
    case = next(case for case in CASES if case.id == case_id)
    case = Case(case.entry, case.bad_input, case.source, case.extra + EXISTING_OUTPUT[case_id], case.expected)
    out = tmp_path / "out"
    (out / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    for name in ("config.json", "gain.png", "spectrum.png", "results.json", "checkpoints/checkpoint-3/model.safetensors"):
        (out / name).write_text(f"{name} of an earlier run\n")
    before = _snapshot(out)
    status, stderr = run_case(case, inputs, out)
    assert status == 2 and case.expected in error_line(case.entry, stderr)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left beside it


SUBPROCESS_CASES = {
    "hf-jpmhc convert llama: truncated model.safetensors": "console script",
    "python -m eval.run: weights do not match config.json": "python -m",
    "training/pretrain.py: Hub name, Hub offline": "script path",
}


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES, ids=[f"{v}: {k}" for k, v in SUBPROCESS_CASES.items()])
def test_no_traceback_reaches_the_terminal(case_id, inputs, tmp_path):
    case = next(case for case in CASES if case.id == case_id)
    command = ENTRY_POINTS[case.entry].command
    if command == ["hf-jpmhc"]:
        script = Path(sys.executable).with_name("hf-jpmhc")
        if not script.exists():
            pytest.skip("the hf-jpmhc console script is not installed in this environment (pip install -e .)")
        command = [str(script)]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, *case.argv(inputs, out)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert case.expected in error_line(case.entry, result.stderr)
    assert not out.exists()


def test_a_bug_keeps_its_traceback():
    """Only the user's errors are shortened: anything else propagates as it was raised."""
    with pytest.raises(KeyError, match="a bug"), user_errors("prog"):
        raise KeyError("a bug")
    with pytest.raises(RuntimeError, match="size mismatch"), user_errors("prog"):
        raise RuntimeError("size mismatch in a matmul")
    assert describe(IndexError("list index out of range")) is None
    assert describe(FileNotFoundError(2, "No such file or directory", "/x/y")) == "No such file or directory: /x/y; check the path"


def test_saved_outputs_have_ordinary_permissions(inputs, tmp_path):
    """A converted checkpoint (its safetensors written through a temporary file), a plot and a JSON file get the
    modes of an ordinary write under the umask: 0644 / 0755 under 022, 0640 / 0750 under 027."""
    from hf_jpmhc.cli import main

    for umask in (0o022, 0o027):
        previous = os.umask(umask)
        try:
            out = tmp_path / f"umask-{umask:03o}"
            main(["convert", "llama", inputs["llama"], str(out / "converted"), "--streams", "2"])
            main(["spectrum", "--mixer", "stiefel", "--depth", "1", "--hidden", "16", "--samples", "1", "--density-draws",
                  "1", "--branch", "lm", "--output", str(out / "spectrum.png"), "--json", str(out / "spectrum.json")])  # fmt: skip
            assert_ordinary_permissions(out / "converted", umask)
            assert (out / "converted" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
            for name in ("spectrum.png", "spectrum.json"):
                assert_ordinary_permissions(out / name, umask)
        finally:
            os.umask(previous)
