"""PEFT with JPmHC models: LoRA on the Llama projections, the hyper-connections trained alongside.

JPmHC keeps Llama's module names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``,
``down_proj``), so a ``LoraConfig`` written for Llama applies unchanged. The hyper-connections (Φ, b, α of
every ``attn_hc``/``mlp_hc`` and the ``stream_collapse`` head) are small and are new after a conversion, so
they are best trained fully: list them in ``modules_to_save``. PEFT then trains a copy of each, routes the
decoder's ``read``/``write`` calls to that copy, and saves it in the adapter file next to the LoRA weights.

```python
>>> from peft import LoraConfig, get_peft_model
>>> from hf_jpmhc import convert_llama
>>> from hf_jpmhc.peft_utils import hyper_connection_module_names
>>> model = convert_llama("HuggingFaceTB/SmolLM2-135M-Instruct", num_streams=4, mixer="stiefel")
>>> config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], modules_to_save=hyper_connection_module_names(model))
>>> peft_model = get_peft_model(model, config)
```
"""

from __future__ import annotations

from torch import nn

from .models.hyper_connection import HyperConnection, StreamCollapse

# The Llama projections LoRA usually targets, for a LoraConfig written without looking at the model.
LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hyper_connection_module_names(model: nn.Module) -> list[str]:
    """The module names to pass as ``modules_to_save`` so the hyper-connections train with the adapters.

    Returns the distinct attribute names (e.g. ``["attn_hc", "mlp_hc", "stream_collapse"]``) of the modules
    holding hyper-connection parameters; PEFT matches them as suffixes of the full module names. A mean
    ``stream_collapse`` (``hc_collapse="mean"``) has no parameters and is left out.
    """
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (HyperConnection, StreamCollapse)) and any(True for _ in module.parameters())
    }
    if not names:
        raise ValueError(f"{type(model).__name__} has no hyper-connection parameters to train")
    return sorted(names)


__all__ = ["LLAMA_LORA_TARGETS", "hyper_connection_module_names"]
