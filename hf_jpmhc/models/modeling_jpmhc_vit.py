"""JPmHC vision transformer: a ViT encoder whose residual is n hyper-connected streams (SPEC §1).

Patch/CLS/position embeddings, attention, MLP and layer norms are transformers' own ViT modules with ViT's
parameter names, so a ``ViTForImageClassification`` state dict loads with ``strict=False``; only the residual
changes. ViT is pre-norm; per encoder layer, with X the streams (B, T, n, C) and T = 1 + number of patches:

    u, post, H = attn_hc.read(X);   X = Hᵀ X + post ⊗ Dropout(Attn(layernorm_before(u)))
    u, post, H = mlp_hc.read(X);    X = Hᵀ X + post ⊗ Dropout(MLP(layernorm_after(u)))

Streams are expanded from the embeddings and collapsed before the final ``layernorm``; the classifier reads
the CLS token, as in ViT.
"""

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.models.vit.modeling_vit import ViTAttention, ViTEmbeddings, ViTMLP, ViTPooler, ViTPreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_jpmhc_vit import JPmHCViTConfig
from .hyper_connection import HYPER_CONNECTION_MODULES, HyperConnectedLayer, expand_streams
from .modeling_jpmhc import JPmHCPreTrainedModel, build_hyper_connection, build_stream_collapse


class JPmHCViTLayer(HyperConnectedLayer):
    """transformers' ``ViTLayer`` with each residual ``h + F(norm(h))`` replaced by a hyper-connection."""

    def __init__(self, config: JPmHCViTConfig, layer_idx: int):
        super().__init__()
        self.hc_recompute = config.hc_recompute
        self.attention = ViTAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ViTMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attn_hc = build_hyper_connection(config, 2 * layer_idx, config.layer_norm_eps)
        self.mlp_hc = build_hyper_connection(config, 2 * layer_idx + 1, config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,  # the streams X: (B, T, n, C)
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        u, post, mix = self.attn_hc.read(hidden_states)  # (B, T, C)
        attn_output, _ = self.attention(self.layernorm_before(u), attention_mask, **kwargs)
        hidden_states = self.attn_hc.write(hidden_states, self.dropout(attn_output), post, mix)
        u, post, mix = self.mlp_hc.read(hidden_states)
        return self.mlp_hc.write(hidden_states, self.dropout(self.mlp(self.layernorm_after(u))), post, mix)


class JPmHCViTPreTrainedModel(ViTPreTrainedModel, JPmHCPreTrainedModel):
    """Weight init is inherited, not copied: ``ViTPreTrainedModel`` initialises the CLS and position embeddings,
    then defers (MRO) to ``JPmHCPreTrainedModel`` for the function-preserving hyper-connection init (SPEC §3)."""

    config: JPmHCViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViTEmbeddings", "JPmHCViTLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": JPmHCViTLayer, "attentions": ViTAttention}
    # Coefficients and mixers are float32 whatever the model dtype (SPEC §1).
    _keep_in_fp32_modules_strict = list(HYPER_CONNECTION_MODULES)


class JPmHCViTModel(JPmHCViTPreTrainedModel):
    def __init__(self, config: JPmHCViTConfig, add_pooling_layer: bool = True, use_mask_token: bool = False):
        r"""
        add_pooling_layer: add ViT's tanh pooler on the CLS token (``pooler_output``).
        use_mask_token:    add the mask token of masked image modelling (``bool_masked_pos``).
        """
        super().__init__(config)
        self.embeddings = ViTEmbeddings(config, use_mask_token=use_mask_token)
        self.layers = nn.ModuleList([JPmHCViTLayer(config, i) for i in range(config.num_hidden_layers)])
        self.stream_collapse = build_stream_collapse(config, config.layer_norm_eps)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTPooler(config) if add_pooling_layer else None
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,  # (B, num_channels, H, W)
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        if pixel_values is None:
            raise ValueError("pixel_values is required: a (batch, num_channels, height, width) tensor")
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        embeddings = self.embeddings(
            pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=interpolate_pos_encoding
        )  # (B, T, C)
        attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=embeddings, attention_mask=attention_mask
        )
        streams = expand_streams(embeddings, self.config.num_streams)  # (B, T, n, C)
        for layer in self.layers:
            streams = layer(streams, attention_mask, **kwargs)
        sequence_output = self.layernorm(self.stream_collapse(streams))  # (B, T, C)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output)


class JPmHCViTForImageClassification(JPmHCViTPreTrainedModel):
    """A linear classifier on the final CLS token, as ``ViTForImageClassification``."""

    def __init__(self, config: JPmHCViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = JPmHCViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        outputs: BaseModelOutputWithPooling = self.vit(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, attention_mask=attention_mask, **kwargs
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0, :])  # CLS token: (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = ["JPmHCViTPreTrainedModel", "JPmHCViTModel", "JPmHCViTForImageClassification"]
