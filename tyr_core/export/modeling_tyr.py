"""A Llama-family causal LM with per-layer head counts and MLP widths, as tyr exports pruned models.

Self-contained (torch + transformers only) so it loads with ``trust_remote_code=True`` where tyr is not installed.
Attention keeps, per layer, the query heads that survived and the KV heads any of them read; ``kv_map`` tells
each query head its KV head, so GQA groups pruned unevenly need no padding. Dropped sublayers are skipped.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from .configuration_tyr import TyrConfig


class TyrAttention(nn.Module):
    def __init__(self, config: TyrConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.n_heads = config.layer_heads[layer_idx]
        self.n_kv = config.layer_kv_heads[layer_idx]
        h, q, kv = config.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(h, q, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, kv, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, kv, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q, h, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.kv_map = list(config.layer_kv_map[layer_idx])  # a plain list: from_pretrained never touches it

    def forward(self, x, position_embeddings, mask, past_key_values=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        kv_map = torch.tensor(self.kv_map, dtype=torch.long, device=k.device)
        k, v = k.index_select(1, kv_map), v.index_select(1, kv_map)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class TyrMLP(nn.Module):
    def __init__(self, config: TyrConfig, layer_idx: int):
        super().__init__()
        h, n = config.hidden_size, config.layer_intermediate[layer_idx]
        self.gate_proj = nn.Linear(h, n, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, n, bias=config.mlp_bias)
        self.down_proj = nn.Linear(n, h, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TyrDecoderLayer(nn.Module):
    def __init__(self, config: TyrConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.has_attn = config.layer_heads[layer_idx] > 0
        self.has_mlp = config.layer_intermediate[layer_idx] > 0
        if self.has_attn:
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = TyrAttention(config, layer_idx)
        if self.has_mlp:
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = TyrMLP(config, layer_idx)
        self.head_dim = config.head_dim

    def forward(self, x, position_embeddings, mask, past_key_values=None):
        if self.has_attn:
            x = x + self.self_attn(self.input_layernorm(x), position_embeddings, mask, past_key_values)
        elif past_key_values is not None:  # keep the cache's layer count and sequence length consistent
            empty = x.new_zeros(x.shape[0], 0, x.shape[1], self.head_dim)
            past_key_values.update(empty, empty, self.layer_idx)
        if self.has_mlp:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class TyrPreTrainedModel(PreTrainedModel):
    config_class = TyrConfig
    base_model_prefix = "model"
    _no_split_modules = ["TyrDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True


def _mask(attention_mask, q_len: int, past: int, dtype, device):
    """Boolean (B, 1, q, k) mask: causal with an offset for cached tokens, and padding; None when plain causal."""
    k_len = past + q_len
    if attention_mask is None and (q_len == 1 or past == 0):
        return None
    causal = torch.arange(k_len, device=device)[None, :] <= (past + torch.arange(q_len, device=device))[:, None]
    mask = causal[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -k_len:].bool()
    return mask


class TyrModel(TyrPreTrainedModel):
    def __init__(self, config: TyrConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TyrDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(x.shape[1], device=x.device) + past)[None]
        pos = self.rotary_emb(x, position_ids)
        mask = _mask(attention_mask, x.shape[1], past, x.dtype, x.device)
        for layer in self.layers:
            x = layer(x, pos, mask, past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), past_key_values=past_key_values)


class TyrForCausalLM(TyrPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TyrConfig):
        super().__init__(config)
        self.model = TyrModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
