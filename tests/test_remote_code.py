"""A ``save_pretrained`` checkpoint carries its code (``auto_map`` + the model files) and loads with
``trust_remote_code=True`` in a fresh virtual environment where hf_jpmhc is not installed — and refuses, there
too, weights that do not match its config (``models/loading.py`` travels with the code).

The fresh venv is real (``python -m venv --without-pip``) but borrows this venv's third-party packages
through a ``deps.pth`` path line: a path in a .pth file is added to ``sys.path``, while the .pth files *inside*
that directory — among them hf_jpmhc's editable-install hook — are not processed. (With a regular install the
site-packages are mirrored by symlinks without hf_jpmhc.) The child asserts that ``import hf_jpmhc`` fails
before it loads anything.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import torch

import hf_jpmhc  # noqa: F401  (registers the Auto classes and auto_map)
from hf_jpmhc import JPmHCConfig, JPmHCForCausalLM
from tests.conftest import tiny_llama_kwargs
from tests.test_modeling import perturb_hyper_connections, token_batch

# The mixers with constant bases (non-persistent buffers) and the DeepSeek-compatible one.
MIXERS = ("sinkhorn", "permutation", "grassmann", "stiefel")
CODE_FILES = {"configuration_jpmhc.py", "configuration_hyper_connection.py", "modeling_jpmhc.py", "hyper_connection.py",
              "hc_kernels.py", "stream_passes.py", "mixers.py", "sinkhorn.py", "cayley.py", "loading.py"}  # fmt: skip

CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys
    import torch

    assert importlib.util.find_spec("hf_jpmhc") is None, "hf_jpmhc must not be importable here"
    try:
        import hf_jpmhc  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("import hf_jpmhc succeeded in the fresh venv")

    from transformers import AutoModelForCausalLM

    request = json.loads(sys.argv[1])
    ids = torch.tensor(request["ids"])
    results = {}
    for mixer, directory in request["checkpoints"].items():
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        results[mixer] = {"module": type(model).__module__, "logits": logits, "generated": generated}
    try:
        AutoModelForCausalLM.from_pretrained(request["mismatched"], trust_remote_code=True)
    except Exception as error:
        results["mismatch"] = (type(error).__name__, type(error).__module__, str(error))
    results["prefix"] = sys.prefix
    results["hf_jpmhc_loaded"] = any(name.split(".")[0] == "hf_jpmhc" for name in sys.modules)
    torch.save(results, request["output"])
    """
)


def dependencies_without_hf_jpmhc(target: Path) -> list[Path]:
    """This venv's site-packages, as is when hf_jpmhc is installed editable (its hook is a .pth file, which a
    path line does not process); otherwise mirrored into ``target`` by symlinks, leaving hf_jpmhc out."""
    roots = sorted({Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")})
    if not any((root / "hf_jpmhc").exists() for root in roots):
        return roots
    target.mkdir()
    for root in roots:
        for entry in root.iterdir():
            if not entry.name.startswith("hf_jpmhc") and not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    return [target]


def fresh_venv(root: Path, dependencies: list[Path]) -> Path:
    """A new venv without pip whose sys.path also holds ``dependencies`` (via deps.pth); returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(purelib).mkdir(parents=True, exist_ok=True)
    (Path(purelib) / "deps.pth").write_text("".join(f"{path}\n" for path in dependencies))
    return python


def test_checkpoint_loads_as_remote_code_without_hf_jpmhc(tmp_path):
    ids = token_batch(length=6)
    checkpoints, references = {}, {}
    for mixer in MIXERS:
        model = perturb_hyper_connections(JPmHCForCausalLM(JPmHCConfig(**tiny_llama_kwargs(mixer=mixer)))).eval()
        directory = tmp_path / f"ckpt-{mixer}"
        model.save_pretrained(directory)
        config = json.loads((directory / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_jpmhc.JPmHCForCausalLM"
        assert config["auto_map"]["AutoConfig"] == "configuration_jpmhc.JPmHCConfig"
        assert CODE_FILES <= {path.name for path in directory.glob("*.py")}
        with torch.no_grad():
            logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        checkpoints[mixer], references[mixer] = str(directory), (logits, generated)

    python = fresh_venv(tmp_path / "venv", dependencies_without_hf_jpmhc(tmp_path / "deps"))
    workdir = tmp_path / "cwd"  # not the repository, whose hf_jpmhc/ would be importable from the cwd
    workdir.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1")
    mismatched = tmp_path / "mismatched"  # the stiefel checkpoint with num_streams edited in config.json
    shutil.copytree(checkpoints["stiefel"], mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "num_streams": 2}))
    output = tmp_path / "results.pt"
    request = {"ids": ids.tolist(), "checkpoints": checkpoints, "mismatched": str(mismatched), "output": str(output)}
    child = subprocess.run(
        [str(python), "-c", CHILD, json.dumps(request)], cwd=workdir, env=env, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr[-4000:]

    results = torch.load(output)
    assert Path(results["prefix"]).resolve() == (tmp_path / "venv").resolve()
    assert not results["hf_jpmhc_loaded"]
    name, module, message = results["mismatch"]
    assert name == "CheckpointMismatchError" and module.startswith("transformers_modules."), (name, module)
    assert "the weights do not match config.json (of another shape model.layers.{0, 1}.attn_hc.bias" in message
    for mixer in MIXERS:
        result = results[mixer]
        assert result["module"].startswith("transformers_modules."), result["module"]
        logits, generated = references[mixer]
        torch.testing.assert_close(result["logits"], logits, rtol=0, atol=1e-6, msg=mixer)
        assert torch.equal(result["generated"], generated), mixer
