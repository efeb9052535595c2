"""Model cards for JPmHC checkpoints, from ``model_cards/jpmhc.md`` through huggingface_hub's ``ModelCard``."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .models.hyper_connection import is_hyper_connection_parameter

MIXER_DESCRIPTIONS = {
    "identity": "H = I, a plain residual",
    "unconstrained": "unconstrained H, Hyper-Connections arXiv 2409.19606",
    "sinkhorn": "doubly stochastic by Sinkhorn–Knopp, mHC arXiv 2512.24880",
    "permutation": "convex combination of permutations, mHC-lite",
    "kronecker": "Kronecker product of doubly-stochastic factors, KromHC",
    "spectral": "spectral-sphere mixer, sHC",
    "transport": "transportation-polytope mixer, TBP-mHC",
    "stiefel": "orthogonal by the Cayley transform, JPmHC arXiv 2602.18308",
    "grassmann": "rank-p Grassmann mixer, after JPmHC",
}
PIPELINE_TAGS = {"JPmHCForCausalLM": "text-generation", "JPmHCViTForImageClassification": "image-classification"}
AUTO_CLASSES = {"JPmHCForCausalLM": "AutoModelForCausalLM", "JPmHCViTForImageClassification": "AutoModelForImageClassification"}


def build_model_card(
    model,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    training: str | None = None,
    evaluation: str | None = None,
    eval_results: list[EvalResult] | None = None,
) -> ModelCard:
    """A filled ``ModelCard`` for ``model``; ``training``/``evaluation`` are markdown sections."""
    config = model.config
    architecture = type(model).__name__
    hc_parameters = sum(p.numel() for name, p in model.named_parameters() if is_hyper_connection_parameter(name))
    options = {k: v for k, v in config.mixer_options.items() if _option_applies(config.mixer, k)}
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS.get(architecture),
        tags=["hf_jpmhc", "hyper-connections", f"mixer-{config.mixer}", "custom_code"],
        base_model=base_model,
        datasets=datasets,
        eval_results=eval_results,
        model_name=repo_id or f"jpmhc-{config.mixer}-n{config.num_streams}",
    )
    return ModelCard.from_template(
        card_data,
        template_str=(files("hf_jpmhc") / "model_cards" / "jpmhc.md").read_text(encoding="utf-8"),
        model_name=card_data.model_name,
        architecture=architecture,
        model_type=config.model_type,
        num_streams=config.num_streams,
        mixer=config.mixer,
        mixer_description=MIXER_DESCRIPTIONS[config.mixer],
        mixer_options="".join(f", {k}={v}" for k, v in options.items()),
        dynamic=config.dynamic,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_parameters=f"{model.num_parameters():,}",
        hc_parameters=f"{hc_parameters:,}",
        base_model=base_model,
        auto_class=AUTO_CLASSES.get(architecture, "AutoModel"),
        repo_id=repo_id or "path/to/checkpoint",
        training=training,
        evaluation=evaluation,
    )


def _option_applies(mixer: str, option: str) -> bool:
    prefix = {"sinkhorn": "sinkhorn_", "stiefel": "cayley_", "grassmann": "grassmann_"}.get(mixer)
    return prefix is not None and option.startswith(prefix)


def save_pretrained_with_card(model, save_directory: str | Path, **card_kwargs) -> Path:
    """``model.save_pretrained`` plus a README.md model card; returns the directory."""
    save_directory = Path(save_directory)
    model.save_pretrained(save_directory)
    build_model_card(model, **card_kwargs).save(save_directory / "README.md")
    return save_directory
