"""``from_pretrained`` of a JPmHC checkpoint whose weights do not match its config raises CheckpointMismatchError
(hf_jpmhc/models/loading.py) instead of transformers' default, which initialises what is absent and warns; what
transformers legitimately forgives still loads. ``hf_jpmhc.loading.load_pretrained`` applies the same check to
other classes (the Llama and ViT sources of a conversion). Remote code: tests/test_remote_code.py.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForImageClassification,
                          AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM)  # fmt: skip

from hf_jpmhc import JPmHCConfig, JPmHCForCausalLM, JPmHCModel, JPmHCViTConfig, JPmHCViTForImageClassification
from hf_jpmhc.loading import load_pretrained
from hf_jpmhc.models.loading import CheckpointMismatchError
from tests.conftest import tiny_llama_kwargs
from tests.test_modeling import perturb_hyper_connections, token_batch

VIT = dict(image_size=28, patch_size=7, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=64, num_labels=3)  # fmt: skip


def edited(source: Path, target: Path, **changes) -> Path:
    """A copy of checkpoint ``source`` whose config.json says something else than its weights."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saved checkpoints: {"lm": stiefel n = 4 (untied), "tied": tied embeddings, "vit": JPmHC-ViT, "llama": Llama}."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    models = {
        "lm": perturb_hyper_connections(JPmHCForCausalLM(JPmHCConfig(**tiny_llama_kwargs(mixer="stiefel")))),
        "tied": JPmHCForCausalLM(JPmHCConfig(**tiny_llama_kwargs(mixer="sinkhorn"), tie_word_embeddings=True)),
        "vit": JPmHCViTForImageClassification(JPmHCViTConfig(**VIT, num_streams=4, mixer="grassmann")),
        "llama": LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs())),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
    return root, models


# config edit → what the error names
LM_EDITS = {
    "num_streams 4 → 2": ({"num_streams": 2}, "of another shape model.layers.{0, 1}.attn_hc.bias (file (14,), config (5,))"),
    "mixer stiefel → sinkhorn": ({"mixer": "sinkhorn"}, "model.layers.{0, 1}.attn_hc.phi (file (14, 256), config (24, 256))"),
    "a layer more": ({"num_hidden_layers": 3}, "missing model.layers.2."),
    "a layer fewer": ({"num_hidden_layers": 1}, "unexpected model.layers.1."),
    "dynamic → static": ({"dynamic": False}, "unexpected model.layers.{0, 1}.attn_hc.phi, model.layers.{0, 1}.mlp_hc.phi"),
    "learned → mean collapse": ({"hc_collapse": "mean"}, "unexpected model.stream_collapse.alpha"),
}


@pytest.mark.parametrize("edit", LM_EDITS)
def test_language_model_with_an_edited_config_is_refused(edit, saved, tmp_path):
    root, _ = saved
    changes, named = LM_EDITS[edit]
    directory = edited(root / "lm", tmp_path / "edited", **changes)
    for load in (JPmHCForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(CheckpointMismatchError, match="the weights do not match config.json") as error:
            load(directory)
        assert named in str(error.value)
        assert str(error.value).startswith(f"{directory}: ") and "\n" not in str(error.value)


def test_tied_checkpoint_loads_and_untying_it_is_refused(saved, tmp_path):
    root, models = saved
    loaded = AutoModelForCausalLM.from_pretrained(root / "tied")  # lm_head.weight is not in the file
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded(token_batch()).logits, models["tied"](token_batch()).logits, rtol=0, atol=0)
    with pytest.raises(CheckpointMismatchError, match=r"\(missing lm_head.weight\)"):
        AutoModelForCausalLM.from_pretrained(edited(root / "tied", tmp_path / "untied", tie_word_embeddings=False))


def test_vit_with_an_edited_config_is_refused(saved, tmp_path):
    root, _ = saved
    with pytest.raises(CheckpointMismatchError, match=r"of another shape vit.layers.\{0, 1\}.attn_hc.bias"):
        AutoModelForImageClassification.from_pretrained(edited(root / "vit", tmp_path / "n2", num_streams=2))
    with pytest.raises(CheckpointMismatchError, match=r"grassmann|attn_hc"):
        AutoModelForImageClassification.from_pretrained(edited(root / "vit", tmp_path / "rank", grassmann_rank=1))
    with pytest.raises(CheckpointMismatchError, match="unexpected vit.layers.1."):
        AutoModelForImageClassification.from_pretrained(edited(root / "vit", tmp_path / "layers", num_hidden_layers=1))


def test_a_task_switch_still_loads_its_body(saved):
    """A head the checkpoint's class lacks starts at its initialisation, one this class lacks is dropped —
    transformers' behaviour for a task switch; the body must still load completely."""
    root, models = saved
    classifier = AutoModelForSequenceClassification.from_pretrained(root / "lm", num_labels=3)  # new score head
    assert torch.equal(classifier.model.layers[1].mlp_hc.phi, models["lm"].model.layers[1].mlp_hc.phi)
    body = AutoModel.from_pretrained(root / "lm")  # lm_head dropped
    assert type(body) is JPmHCModel
    torch.testing.assert_close(body(token_batch()).last_hidden_state,
                               models["lm"].model(token_batch()).last_hidden_state, rtol=0, atol=0)  # fmt: skip
    vit_body = AutoModel.from_pretrained(root / "vit")  # classifier dropped, ViT's pooler new
    assert vit_body.pooler is not None
    with pytest.raises(CheckpointMismatchError, match="unexpected model.layers.1."):  # ... but not a body with a layer less
        AutoModel.from_pretrained(root / "lm", num_hidden_layers=1)


def test_ignore_mismatched_sizes_keeps_its_meaning(saved):
    """``ignore_mismatched_sizes=True`` still re-initialises weights of another shape (here a 5-class head);
    without it the same load is refused, naming the head."""
    root, models = saved
    with pytest.raises(CheckpointMismatchError, match=r"classifier.weight \(file \(3, 32\), config \(5, 32\)\)"):
        AutoModelForImageClassification.from_pretrained(root / "vit", num_labels=5)
    model = AutoModelForImageClassification.from_pretrained(root / "vit", num_labels=5, ignore_mismatched_sizes=True)
    assert model.classifier.out_features == 5
    assert torch.equal(model.vit.layers[0].attn_hc.phi, models["vit"].vit.layers[0].attn_hc.phi)


def test_load_pretrained_checks_other_classes_too(saved, tmp_path):
    """A Llama (the source of a conversion) with a layer more in config.json: plain from_pretrained initialises
    layer 2 and goes on; load_pretrained refuses it, and loads the intact checkpoint as from_pretrained does."""
    root, models = saved
    directory = edited(root / "llama", tmp_path / "llama3", num_hidden_layers=3)
    assert len(LlamaForCausalLM.from_pretrained(directory).model.layers) == 3  # transformers' default
    with pytest.raises(CheckpointMismatchError, match="missing model.layers.2."):
        load_pretrained(LlamaForCausalLM, directory)
    loaded = load_pretrained(AutoModelForCausalLM, root / "llama")
    torch.testing.assert_close(loaded(token_batch()).logits, models["llama"](token_batch()).logits, rtol=0, atol=0)
