"""Checkpoints move between the ends of the supported transformers range (CI's two environments).

``HF_JPMHC_OTHER_PYTHON`` names the other environment's python (``make test`` sets it: the lowest declared
versions for the newest leg, the newest releases for the lowest leg). Checkpoints saved here load as remote code
there (the files they carry, hf_jpmhc not imported) and generate the same greedy tokens, cached and uncached; the
other end re-saves them with its own transformers and hf_jpmhc, and they load here (through the installed
hf_jpmhc) to the same logits and tokens. Without the
variable the test skips, except under CI, where the second environment is part of the run.
"""

import json
import os
import subprocess
import textwrap

import pytest
import torch

from hf_jpmhc import JPmHCConfig, JPmHCForCausalLM
from hf_jpmhc.models.mixers import MIXERS
from tests.conftest import tiny_llama_kwargs
from tests.test_modeling import perturb_hyper_connections, token_batch

OTHER_PYTHON = os.environ.get("HF_JPMHC_OTHER_PYTHON")
pytestmark = pytest.mark.skipif(
    not OTHER_PYTHON and os.environ.get("CI") != "true",
    reason="HF_JPMHC_OTHER_PYTHON (the other end of the version range) is not set; `make test` sets it",
)

# Runs in the other environment: load each checkpoint as remote code, generate, and re-save it with hf_jpmhc.
CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    request = json.loads(sys.argv[1])
    ids = torch.tensor(request["ids"])
    results = {"transformers": transformers.__version__}
    for mixer, directory in request["checkpoints"].items():
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(ids).logits
        results[mixer] = {
            "module": type(model).__module__,
            "logits": logits,
            "cached": model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True),
            "uncached": model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False),
        }
    import hf_jpmhc  # noqa: F401  (now save with the package, as a user of that environment would)
    from hf_jpmhc import JPmHCForCausalLM

    for mixer, directory in request["checkpoints"].items():
        JPmHCForCausalLM.from_pretrained(directory).save_pretrained(request["resave"][mixer])
    torch.save(results, request["output"])
    """
)


def generations(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(ids).logits
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    return logits, model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs)


def test_checkpoints_move_between_the_ends_of_the_version_range(tmp_path):
    import transformers

    assert OTHER_PYTHON, "CI=true: HF_JPMHC_OTHER_PYTHON must name the other environment's python (see Makefile)"
    ids = token_batch(length=6)
    checkpoints, resaved, references = {}, {}, {}
    for mixer in MIXERS:
        model = perturb_hyper_connections(JPmHCForCausalLM(JPmHCConfig(**tiny_llama_kwargs(mixer=mixer)))).eval()
        checkpoints[mixer], resaved[mixer] = str(tmp_path / f"here-{mixer}"), str(tmp_path / f"there-{mixer}")
        model.save_pretrained(checkpoints[mixer])
        references[mixer] = generations(model, ids)
        torch.testing.assert_close(references[mixer][1], references[mixer][2], rtol=0, atol=0, msg=mixer)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    output = tmp_path / "there.pt"
    request = {"ids": ids.tolist(), "checkpoints": checkpoints, "resave": resaved, "output": str(output)}
    child = subprocess.run([OTHER_PYTHON, "-c", CHILD, json.dumps(request)], cwd=tmp_path, env=env,
                           capture_output=True, text=True)  # fmt: skip
    assert child.returncode == 0, child.stderr[-4000:]
    there = torch.load(output)
    print(f"here: transformers {transformers.__version__}; there: transformers {there['transformers']}")

    for mixer in MIXERS:
        logits, cached, _ = references[mixer]
        result = there[mixer]
        assert result["module"].startswith("transformers_modules."), result["module"]  # the checkpoint's own code
        torch.testing.assert_close(result["logits"], logits, rtol=0, atol=1e-5, msg=mixer)
        assert torch.equal(result["cached"], cached), mixer
        assert torch.equal(result["uncached"], cached), mixer
        # and back: saved by the other end's transformers and hf_jpmhc, loaded here by the installed hf_jpmhc
        model = transformers.AutoModelForCausalLM.from_pretrained(resaved[mixer]).eval()
        back_logits, back_cached, back_uncached = generations(model, ids)
        torch.testing.assert_close(back_logits, logits, rtol=0, atol=1e-5, msg=mixer)
        assert torch.equal(back_cached, cached) and torch.equal(back_uncached, cached), mixer
