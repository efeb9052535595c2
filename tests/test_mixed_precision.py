"""Mixed precision (issue 20; SPEC §1: coefficients and mixers in float32 whatever the model dtype).

Under ``torch.autocast`` only the branches (attention, MLP, patch embedding, heads) run in the autocast dtype; the
hyper-connection maths — RMSNorm, Φ projection, activations, mixer, collapse, stream update and their backwards —
runs in float32 on every kernel backend (``stream_passes.float32_maths``). Checked at three levels:

* one hyper-connection and the collapse head, per backend: under autocast they compute bit for bit what they
  compute without it from the same inputs (the branch output f given in the autocast dtype, as autocast makes it);
* both models, per backend, bf16 and fp16 autocast: three AdamW steps on real data with finite losses close to the
  float32 run's, non-zero gradients on every hyper-connection parameter, the parameters float32 afterwards;
* the training routes: ``training/pretrain.py --mixed_precision bf16``, ``accelerate launch --mixed_precision bf16
  training/pretrain.py`` (slow), ``transformers.Trainer(bf16=True, use_cpu=True)`` and TRL's ``SFTTrainer`` with a
  PEFT LoRA config.

fp16 on CPU: torch 2.13's CPU autocast supports float16, so the models are tested under ``torch.autocast(float16)``.
Accelerate 1.16 turns its native AMP (autocast, GradScaler) on for fp16 only off CPU (``Accelerator.native_amp``), so
``mixed_precision="fp16"`` on CPU — in our scripts, and ``Trainer(fp16=True, use_cpu=True)`` — trains plain float32;
``training.common.build_accelerator`` refuses it (tested here), Trainer runs it silently.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState
from datasets import Dataset
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import Trainer, TrainingArguments
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.vit.modeling_vit import ViTMLP
from trl import SFTConfig, SFTTrainer

from hf_jpmhc import JPmHCConfig, JPmHCForCausalLM, JPmHCViTConfig, JPmHCViTForImageClassification, ops
from hf_jpmhc.data.images import load_image_dataset
from hf_jpmhc.data.text import byte_tokenizer, shakespeare_texts
from hf_jpmhc.models.hyper_connection import HyperConnection, StreamCollapse
from hf_jpmhc.models.mixers import build_mixer
from hf_jpmhc.models.modeling_jpmhc import JPmHCDecoderLayer
from hf_jpmhc.models.modeling_jpmhc_vit import JPmHCViTLayer
from hf_jpmhc.peft_utils import LLAMA_LORA_TARGETS, hyper_connection_module_names
from tests.conftest import tiny_llama_kwargs
from tests.test_pretrain import REPO, TINY_MODEL, curve
from tests.test_vit import TINY_FINETUNE, finetune_main, tiny_vit_kwargs
from training import pretrain
from training.common import build_accelerator

TRITON_MARKS = [pytest.mark.triton,
                pytest.mark.skipif(not ops.triton_available(), reason="triton is not importable: no fused kernels")]
AUTOCAST_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# Whole models under the Triton interpreter take 20–40 s: bf16 only, and slow (the site test covers fp16 there).
MODEL_CASES = [
    pytest.param("torch", torch.bfloat16, id="torch-bf16"),
    pytest.param("torch", torch.float16, id="torch-fp16"),
    pytest.param("compiled", torch.bfloat16, id="compiled-bf16"),
    pytest.param("compiled", torch.float16, id="compiled-fp16"),
    pytest.param("triton", torch.bfloat16, id="triton-bf16", marks=[*TRITON_MARKS, pytest.mark.slow]),
]
HC_MODULES = ("attn_hc", "mlp_hc", "stream_collapse")

# Largest |loss under autocast − float32 loss| over the steps of ``train`` (three AdamW steps at lr 1e-3, the same
# initialisation and batches): the branches' products round to 8 (bf16) or 11 (fp16) mantissa bits. Measured on
# every backend, both models: ≤ 6e-4 (bf16), ≤ 2.3e-4 (fp16) nats, as for a plain Llama of the same shape.
LOSS_TOLERANCE = {torch.bfloat16: 5e-3, torch.float16: 2e-3}
LEARNING_RATE = 1e-3  # at 1e-2, AdamW's first, sign-like updates turn bf16 rounding into 0.01–0.08 nats by step 3


def autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def hyper_connection_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Φ, b and α of every attn_hc / mlp_hc / stream_collapse (PEFT's trainable copies where it made them)."""
    return {name: p for name, p in model.named_parameters()
            if any(f"{m}." in name for m in HC_MODULES) and name.rsplit(".", 1)[-1] in ("phi", "bias", "alpha")
            and p.requires_grad}  # fmt: skip


def assert_hyper_connections_float32(model: torch.nn.Module) -> None:
    params = hyper_connection_parameters(model)
    assert params and {p.dtype for p in params.values()} == {torch.float32}


# ----------------------------------------------------------------------------------------------------
# one hyper-connection: the same numbers with and without autocast
# ----------------------------------------------------------------------------------------------------


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """Non-initial Φ, b, α, so every coefficient depends on the streams."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.ndim == 2 else 0.3))
    return module


def _site_run(hc: HyperConnection, head: StreamCollapse, streams, branch, autocast_dtype, backward_in_autocast: bool):
    """read → write → collapse head, forward under ``autocast_dtype``; the outputs and every gradient."""
    leaves = [streams, branch, *hc.parameters(), *head.parameters()]
    with autocast(autocast_dtype):
        u, post, mix = hc.read(streams)
        out = hc.write(streams, branch, post, mix)
        h = head(out)
    outputs = (u, post, mix, out, h)
    weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(outputs)]
    loss = sum((t.float() * w).sum() for t, w in zip(outputs, weights))
    with autocast(autocast_dtype if backward_in_autocast else None):
        grads = torch.autograd.grad(loss, leaves)
    return outputs, grads


ITERATIVE_CAYLEY = {"cayley_method": "iterative"}  # stiefel through the Triton Cayley kernel on that backend


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize(("backend", "mixer", "options", "backward_in_autocast"), [
    pytest.param("torch", "sinkhorn", {}, True, id="torch-sinkhorn-backward_in_autocast"),
    pytest.param("torch", "stiefel", ITERATIVE_CAYLEY, False, id="torch-stiefel"),
    # kronecker, not sinkhorn: inductor takes ~50 s for Sinkhorn's forward and backward, and no longer for autocast
    pytest.param("compiled", "kronecker", {}, True, id="compiled-kronecker-backward_in_autocast"),
    pytest.param("compiled", "stiefel", ITERATIVE_CAYLEY, False, id="compiled-stiefel"),
    pytest.param("triton", "sinkhorn", {}, True, id="triton-sinkhorn-backward_in_autocast", marks=TRITON_MARKS),
    pytest.param("triton", "stiefel", ITERATIVE_CAYLEY, False, id="triton-stiefel", marks=TRITON_MARKS),
])  # fmt: skip
def test_hyper_connection_maths_ignore_autocast(backend, mixer, options, backward_in_autocast, dtype):
    """Under autocast, read / write / collapse head give bit for bit the float32 results: the Φ projection, the
    mixer's products, the collapse and Hᵀ X do not drop to bf16/fp16, nor do the backwards of our autograd Functions
    (in the sites with ``backward_in_autocast`` every node of the backward is one of them or compiled, so it is run
    inside autocast too)."""
    torch.manual_seed(0)
    hc = _perturbed(HyperConnection(32, build_mixer(mixer, 4, **options), kernel_backend=backend))
    head = _perturbed(StreamCollapse(32, 4, kernel_backend=backend))
    streams = torch.randn(2, 5, 4, 32, requires_grad=True)  # float32, as autocast leaves the residual
    branch = torch.randn(2, 5, 32).to(dtype).requires_grad_()  # f, as autocast's attention/MLP return it
    reference, reference_grads = _site_run(hc, head, streams, branch, None, False)
    outputs, grads = _site_run(hc, head, streams, branch, dtype, backward_in_autocast)
    for name, got, expected in zip(("u", "post", "H", "X'", "h"), outputs, reference):
        assert got.dtype == expected.dtype, name
        torch.testing.assert_close(got, expected, atol=0, rtol=0, msg=name)
    for i, (got, expected) in enumerate(zip(grads, reference_grads)):
        torch.testing.assert_close(got, expected, atol=0, rtol=0, msg=f"gradient {i}")


# ----------------------------------------------------------------------------------------------------
# both models, every backend: a few steps under autocast against the same steps in float32
# ----------------------------------------------------------------------------------------------------


def _lm_batches(steps: int, batch: int = 2, block: int = 8) -> list[dict]:
    """Byte-level blocks from the start of the first Shakespeare play (vocabulary 256)."""
    data = torch.tensor(list(shakespeare_texts()[0].encode("utf-8")[: steps * batch * block]))
    return [{"input_ids": ids, "labels": ids} for ids in data.view(steps, batch, block)]


def _image_batches(steps: int, batch: int = 2) -> list[dict]:
    """MNIST-5k digits scaled to [0, 1] (28×28, one channel)."""
    rows = load_image_dataset("mnist_5k")["train"].select(range(steps * batch)).with_format("torch")[:]
    pixels = rows["image"].float().div(255).view(steps, batch, 1, 28, 28)
    return [{"pixel_values": p, "labels": y} for p, y in zip(pixels, rows["label"].view(steps, batch))]


def _lm(backend: str) -> JPmHCForCausalLM:
    torch.manual_seed(0)
    return JPmHCForCausalLM(JPmHCConfig(**tiny_llama_kwargs(vocab_size=256), num_streams=4, mixer="kronecker",
                                        kernel_backend=backend))  # fmt: skip


def _vit(backend: str) -> JPmHCViTForImageClassification:
    torch.manual_seed(0)
    return JPmHCViTForImageClassification(JPmHCViTConfig(**tiny_vit_kwargs(), num_streams=4, mixer="stiefel",
                                                         kernel_backend=backend))  # fmt: skip


def train(model: torch.nn.Module, batches: list[dict], autocast_dtype) -> tuple[list[float], dict[str, torch.Tensor]]:
    """AdamW steps with the forward under autocast (backward outside, as Accelerate and Trainer run it): the losses
    and the last step's hyper-connection gradients (at the first, Φ = 0 makes ∂α = 0)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    losses = []
    model.train()
    for batch in batches:
        optimizer.zero_grad()
        with autocast(autocast_dtype):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {name: p.grad for name, p in hyper_connection_parameters(model).items()}


def assert_trains_like_float32(losses, float32_losses, grads, model, dtype) -> None:
    assert all(torch.isfinite(torch.tensor(losses)))
    assert len(grads) == len(hyper_connection_parameters(model)) > 0
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and grad.isfinite().all() and grad.abs().sum() > 0, name
    assert {m for name in grads for m in HC_MODULES if f"{m}." in name} == set(HC_MODULES)
    assert_hyper_connections_float32(model)
    assert max(abs(a - b) for a, b in zip(losses, float32_losses)) <= LOSS_TOLERANCE[dtype], (losses, float32_losses)


@pytest.mark.parametrize(("backend", "dtype"), MODEL_CASES)
def test_language_model_trains_under_autocast(backend, dtype):
    batches = _lm_batches(3)
    float32_losses, _ = train(_lm(backend), batches, None)
    model = _lm(backend)
    losses, grads = train(model, batches, dtype)
    assert_trains_like_float32(losses, float32_losses, grads, model, dtype)


@pytest.mark.parametrize(("backend", "dtype"), MODEL_CASES)
def test_vision_model_trains_under_autocast(backend, dtype):
    batches = _image_batches(3)
    float32_losses, _ = train(_vit(backend), batches, None)
    model = _vit(backend)
    losses, grads = train(model, batches, dtype)
    assert_trains_like_float32(losses, float32_losses, grads, model, dtype)


# ----------------------------------------------------------------------------------------------------
# the training routes
# ----------------------------------------------------------------------------------------------------


class RouteProbe:
    """What a training route really ran, observed from outside it (global module-forward and optimizer-step hooks):
    the dtypes of the MLP branches' and the decoder layers' outputs (the streams), and every trainable
    hyper-connection parameter's gradient when the optimiser last stepped, by site kind (attn_hc, mlp_hc,
    stream_collapse; PEFT's trainable copies where it made them)."""

    def __init__(self):
        self.branch_dtypes: set[torch.dtype] = set()
        self.stream_dtypes: set[torch.dtype] = set()
        self.sites: dict[torch.nn.Module, str] = {}
        self.grads: dict[tuple[str, int, str], torch.Tensor] = {}

    def __enter__(self) -> RouteProbe:
        self._handles = [torch.nn.modules.module.register_module_forward_hook(self._forward),
                         register_optimizer_step_pre_hook(self._step)]  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _forward(self, module, args, output) -> None:
        if isinstance(module, (LlamaMLP, ViTMLP)):
            self.branch_dtypes.add(output.dtype)
        elif isinstance(module, (JPmHCDecoderLayer, JPmHCViTLayer)):
            self.stream_dtypes.add(output.dtype)
            for kind in ("attn_hc", "mlp_hc"):
                self.sites.update({m: kind for m in getattr(module, kind).modules() if isinstance(m, HyperConnection)})
        elif isinstance(module, StreamCollapse):
            self.sites[module] = "stream_collapse"

    def _step(self, optimizer, args, kwargs) -> None:
        for index, (site, kind) in enumerate(self.sites.items()):
            for name, p in site.named_parameters():
                if p.requires_grad:
                    self.grads[kind, index, name] = p.grad.detach().clone()

    def assert_mixed_precision(self, dtype: torch.dtype) -> None:
        """The branches ran in ``dtype``, the streams in float32; every hyper-connection parameter (Φ, b, α of each
        kind of site) had a finite, non-zero float32 gradient at the last step and is float32."""
        assert self.branch_dtypes == {dtype} and self.stream_dtypes == {torch.float32}
        assert {kind for kind, _, _ in self.grads} == set(HC_MODULES)
        assert {name for _, _, name in self.grads} == {"phi", "bias", "alpha"}
        for key, grad in self.grads.items():
            assert grad.dtype == torch.float32 and grad.isfinite().all() and grad.abs().sum() > 0, key
        for site in self.sites:
            assert {p.dtype for p in site.parameters()} == {torch.float32}


def reset_accelerate_state() -> None:
    """Accelerate keeps one process-wide state whose mixed precision the first ``Accelerator`` fixes (a later one asking
    for another raises); in-process runs that change it start from, and leave, a reset state (``TrainingArguments``
    resets it before every Trainer, not after)."""
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def fresh_accelerate_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def assert_losses_close(losses: list[float], float32_losses: list[float], dtype: torch.dtype) -> None:
    assert len(losses) == len(float32_losses) > 0 and all(map(torch.isfinite, torch.tensor(losses)))
    assert max(abs(a - b) for a, b in zip(losses, float32_losses)) <= LOSS_TOLERANCE[dtype], (losses, float32_losses)
    assert losses != float32_losses  # autocast was on


PRETRAIN_STEPS = 4


def pretrain_args(output_dir, model_json, **overrides) -> list[str]:
    """A tiny byte-level pretraining run on offline Shakespeare (tests/test_pretrain.py's model), at lr 1e-3."""
    settings = dict(output_dir=output_dir, model=model_json, tokenizer="byte", block_size=32, batch_size=4,
                    max_steps=PRETRAIN_STEPS, warmup_steps=1, learning_rate=LEARNING_RATE, log_every=1, eval_every=0,
                    eval_blocks=8, save_every=0, seed=1)  # fmt: skip
    settings.update(overrides)
    return [f"--{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def model_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.json"
    path.write_text(json.dumps(TINY_MODEL))
    return path


@pytest.fixture(scope="module")
def pretrain_float32(tmp_path_factory, model_json):
    """The float32 pretraining curve every pretrain route is compared with (in-process, fresh Accelerate state)."""
    output_dir = tmp_path_factory.mktemp("float32")
    reset_accelerate_state()
    pretrain.main(pretrain_args(output_dir, model_json, mixed_precision="no"))
    reset_accelerate_state()
    return curve(output_dir)


def assert_saved_float32(final_dir) -> None:
    """Autocast keeps the master weights float32: every tensor of the saved model is F32 on disk."""
    with safe_open(final_dir / "model.safetensors", "pt") as saved:
        dtypes = {saved.get_slice(key).get_dtype() for key in saved.keys()}
        assert any(".attn_hc." in key for key in saved.keys())
    assert dtypes == {"F32"}


def test_pretrain_script_bf16(tmp_path, model_json, pretrain_float32, fresh_accelerate_state):
    with RouteProbe() as probe:
        pretrain.main(pretrain_args(tmp_path, model_json, mixed_precision="bf16"))
    probe.assert_mixed_precision(torch.bfloat16)
    assert_losses_close(list(curve(tmp_path).values()), list(pretrain_float32.values()), torch.bfloat16)
    assert_saved_float32(tmp_path / "final")
    assert "/ bf16 |" in (tmp_path / "final" / "README.md").read_text()  # the card states the precision used


def test_fp16_on_cpu_is_refused(tmp_path, fresh_accelerate_state):
    with pytest.raises(ValueError, match="mixed_precision='fp16' does not autocast on CPU .* use mixed_precision='bf16'"):
        build_accelerator(tmp_path, mixed_precision="fp16")


@pytest.mark.slow
def test_accelerate_launch_bf16(tmp_path, model_json, pretrain_float32):
    """``accelerate launch --mixed_precision bf16`` (2 CPU processes, DDP over gloo) with no precision flag for the
    script: the launcher's setting reaches the Accelerator (an explicit default in the script used to override it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "training/configs/ddp_cpu.yaml",
           "--mixed_precision", "bf16", "--main_process_port", str(port), "training/pretrain.py",
           *pretrain_args(tmp_path, model_json)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert "| 2 × cpu / bf16 |" in (tmp_path / "final" / "README.md").read_text()
    assert_losses_close(list(curve(tmp_path).values()), list(pretrain_float32.values()), torch.bfloat16)
    assert_saved_float32(tmp_path / "final")
    # Gradients reached every hyper-connection parameter: each left its initial value (Φ = 0, α = 0.01; b has no
    # weight decay, so only a gradient moves it).
    weights = load_file(tmp_path / "final" / "model.safetensors")
    config = JPmHCConfig.from_pretrained(tmp_path / "final")
    initial = JPmHCForCausalLM(config).state_dict()
    hc = [key for key in weights if any(f"{m}." in key for m in HC_MODULES)]
    assert {key.rsplit(".", 1)[-1] for key in hc} == {"phi", "bias", "alpha"}
    assert all(not torch.equal(weights[key], initial[key]) for key in hc), [k for k in hc if torch.equal(weights[k], initial[k])]


def _lm_dataset(rows: int = 16, block: int = 16):
    data = torch.tensor(list(shakespeare_texts()[0].encode("utf-8")[: rows * block])).view(rows, block)
    return Dataset.from_dict({"input_ids": data.tolist(), "labels": data.tolist()})


def _trainer_run(tmp_path, bf16: bool) -> tuple[list[float], RouteProbe]:
    args = TrainingArguments(output_dir=str(tmp_path), bf16=bf16, use_cpu=True, max_steps=3, per_device_train_batch_size=2,
                             learning_rate=LEARNING_RATE, logging_steps=1, report_to="none", save_strategy="no",
                             seed=0, dataloader_num_workers=0)  # fmt: skip
    with RouteProbe() as probe:
        trainer = Trainer(model=_lm("torch"), args=args, train_dataset=_lm_dataset())
        trainer.train()
    return [r["loss"] for r in trainer.state.log_history if "loss" in r], probe


def test_transformers_trainer_bf16(tmp_path, fresh_accelerate_state):
    float32_losses, _ = _trainer_run(tmp_path / "float32", bf16=False)
    losses, probe = _trainer_run(tmp_path / "bf16", bf16=True)
    probe.assert_mixed_precision(torch.bfloat16)
    assert_losses_close(losses, float32_losses, torch.bfloat16)


def _sft_run(tmp_path, bf16: bool | None) -> tuple[list[float], RouteProbe]:
    """TRL's SFTTrainer on raw Shakespeare text with the byte tokenizer: LoRA on the Llama projections, the
    hyper-connections trained in full (``modules_to_save``), TRL's defaults otherwise (gradient checkpointing on;
    bf16=None is TRL's default: bf16 unless fp16)."""
    tokenizer = byte_tokenizer()
    text = shakespeare_texts()[0]
    dataset = Dataset.from_dict({"text": [text[i * 120 : (i + 1) * 120] for i in range(16)]})
    model = _lm("torch")
    args = SFTConfig(output_dir=str(tmp_path), bf16=bf16, use_cpu=True, max_steps=3, per_device_train_batch_size=2,
                     learning_rate=LEARNING_RATE, logging_steps=1, report_to="none", save_strategy="no", seed=0,
                     max_length=48, dataloader_num_workers=0)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_LORA_TARGETS),
                      modules_to_save=hyper_connection_module_names(model))  # fmt: skip
    with RouteProbe() as probe:
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
        assert trainer.args.bf16 == (bf16 is not False) and trainer.args.gradient_checkpointing  # TRL's defaults
        trainer.train()
    return [r["loss"] for r in trainer.state.log_history if "loss" in r], probe


def test_trl_sft_trainer_with_lora_bf16(tmp_path, fresh_accelerate_state):
    float32_losses, _ = _sft_run(tmp_path / "float32", bf16=False)
    losses, probe = _sft_run(tmp_path / "bf16", bf16=None)
    probe.assert_mixed_precision(torch.bfloat16)
    assert_losses_close(losses, float32_losses, torch.bfloat16)


def test_vision_finetune_script_bf16(tmp_path, fresh_accelerate_state):
    """``training/finetune_vision.py --mixed_precision bf16`` (the ViT route), against the same run in float32."""
    main = finetune_main()
    settings = ["--max_steps=3", "--learning_rate=1e-3", *TINY_FINETUNE]
    float32 = main([f"--output_dir={tmp_path / 'float32'}", "--mixed_precision=no", *settings])
    reset_accelerate_state()
    with RouteProbe() as probe:
        bf16 = main([f"--output_dir={tmp_path / 'bf16'}", "--mixed_precision=bf16", *settings])
    probe.assert_mixed_precision(torch.bfloat16)
    assert abs(bf16["test_loss"] - float32["test_loss"]) <= LOSS_TOLERANCE[torch.bfloat16], (bf16, float32)
    assert_saved_float32(tmp_path / "bf16" / "final")
