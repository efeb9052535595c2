"""JPmHC causal LM: a Llama decoder whose residual is n hyper-connected streams (SPEC §1).

Attention, MLP, norms and rotary embeddings are transformers' own Llama modules; only the residual
changes. Per decoder layer, with X the streams (B, T, n, C):

    u, post, H = attn_hc.read(X);   X = Hᵀ X + post ⊗ Attn(norm(u))
    u, post, H = mlp_hc.read(X);    X = Hᵀ X + post ⊗ MLP(norm(u))

K/V caches are untouched: attention only ever sees the single-stream input u.
"""

import inspect

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_jpmhc import JPmHCConfig
from .hyper_connection import (
    HYPER_CONNECTION_MODULES,
    HyperConnectedLayer,
    HyperConnection,
    StreamCollapse,
    expand_streams,
)
from .loading import StrictLoadingMixin
from .mixers import Mixer, build_mixer

try:  # transformers >= 5.21
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """The last ``logits_to_keep`` positions (0: all) or the given 1-D positions: (B, T, C) → (B, T', C)."""
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, keep, :]


# transformers 5.24 renamed the KV-cache argument and output field ``past_key_values`` → ``cache`` (models, masks,
# outputs and generate; the old name is deprecated until 5.40). CACHE is the installed version's name, read once
# from its own Llama attention: the model passes the cache on under that name and returns it in that field, so it
# speaks each version's API, without deprecation warnings, from one source file (remote code runs on any version).
CACHE = "cache" if "cache" in inspect.signature(LlamaAttention.forward).parameters else "past_key_values"

def build_hyper_connection(config, site: int, norm_eps: float) -> HyperConnection:
    """The hyper-connection of branch number ``site`` (2·layer for attention, 2·layer + 1 for the MLP)."""
    return HyperConnection(
        config.hidden_size,
        build_mixer(config.mixer, config.num_streams, **config.mixer_options),
        home_stream=site,
        dynamic=config.dynamic,
        alpha_init=config.hc_alpha_init,
        pre_eps=config.hc_pre_eps,
        norm_eps=norm_eps,
        kernel_backend=config.kernel_backend,
    )


def build_stream_collapse(config, norm_eps: float) -> StreamCollapse:
    return StreamCollapse(
        config.hidden_size,
        config.num_streams,
        learned=config.hc_collapse == "learned",
        alpha_init=config.hc_alpha_init,
        pre_eps=config.hc_pre_eps,
        norm_eps=norm_eps,
        kernel_backend=config.kernel_backend,
    )


class JPmHCDecoderLayer(HyperConnectedLayer):
    def __init__(self, config: JPmHCConfig, layer_idx: int):
        super().__init__()
        self.hc_recompute = config.hc_recompute
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn_hc = build_hyper_connection(config, 2 * layer_idx, config.rms_norm_eps)
        self.mlp_hc = build_hyper_connection(config, 2 * layer_idx + 1, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,  # the streams X: (B, T, n, C)
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],  # the KV cache arrives here, under the name CACHE
    ) -> torch.Tensor:
        u, post, mix = self.attn_hc.read(hidden_states)  # (B, T, C)
        attn_output, _ = self.self_attn(
            hidden_states=self.input_layernorm(u),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = self.attn_hc.write(hidden_states, attn_output, post, mix)
        u, post, mix = self.mlp_hc.read(hidden_states)
        return self.mlp_hc.write(hidden_states, self.mlp(self.post_attention_layernorm(u)), post, mix)


class JPmHCPreTrainedModel(StrictLoadingMixin, PreTrainedModel):  # from_pretrained refuses mismatched weights
    config: JPmHCConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["JPmHCDecoderLayer"]
    _skip_keys_device_placement = [CACHE]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": JPmHCDecoderLayer, "attentions": LlamaAttention}
    # Coefficients and mixers are float32 whatever the model dtype (SPEC §1).
    _keep_in_fp32_modules_strict = list(HYPER_CONNECTION_MODULES)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, HyperConnection):
            if module.phi is not None:
                init.zeros_(module.phi)
            init.copy_(module.bias, module.initial_bias())
            init.constant_(module.alpha, module.alpha_init)
        elif isinstance(module, StreamCollapse) and module.phi is not None:
            init.zeros_(module.phi)
            init.constant_(module.bias, module.initial_bias)
            init.constant_(module.alpha, module.alpha_init)
        elif isinstance(module, Mixer):  # from_pretrained re-creates non-persistent buffers empty
            for name, value in module.constant_buffers().items():
                init.copy_(getattr(module, name), value)


class JPmHCModel(JPmHCPreTrainedModel):
    """Embed → expand to n streams → decoder layers → collapse → norm.

    ``output_hidden_states=True`` returns ``num_hidden_layers + 1`` tensors (transformers' Llama convention with
    the streams kept): entry l < L is the residual entering layer l, all n streams ``(B, T, n, C)`` (entry 0 is the
    expanded embedding); the last entry is ``last_hidden_state`` ``(B, T, C)``, collapsed and normed.
    """

    def __init__(self, config: JPmHCConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([JPmHCDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.stream_collapse = build_stream_collapse(config, config.rms_norm_eps)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        cache = kwargs.pop("past_key_values", cache)  # the name generate() passes before transformers 5.24
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE: cache},
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)

        streams = expand_streams(inputs_embeds, self.config.num_streams)  # (B, T, n, C)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            streams = decoder_layer(
                streams,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                **{CACHE: cache},
                **kwargs,
            )
        hidden_states = self.norm(self.stream_collapse(streams))  # (B, T, C)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE: cache})


class JPmHCForCausalLM(JPmHCPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: JPmHCConfig):
        super().__init__(config)
        self.model = JPmHCModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        cache = kwargs.pop("past_key_values", cache)  # the name generate() passes before transformers 5.24
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE: getattr(outputs, CACHE)},
        )


class JPmHCForSequenceClassification(GenericForSequenceClassification, JPmHCPreTrainedModel): ...


__all__ = ["JPmHCPreTrainedModel", "JPmHCModel", "JPmHCForCausalLM", "JPmHCForSequenceClassification"]
