"""A Llama-family causal LM with per-layer head counts and MLP widths: the compact form of a tyr-pruned model.

Self-contained (torch and transformers only, plus the sibling configuration file) because it is copied next to the
exported weights, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without tyr.

Per layer, attention keeps the query heads that survived and the KV heads at least one of them reads; ``kv_map``
tells each query head its KV head, so GQA groups pruned unevenly need no padding. A sublayer with nothing left is
skipped (residual only). Covers Llama 2/3.x and Mistral, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm
before RoPE); RoPE variants come from transformers' ``ROPE_INIT_FUNCTIONS``. Attention is SDPA or eager; the KV
cache is transformers' ``DynamicCache``, so ``generate()`` works.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from .configuration_tyr import TyrConfig


class TyrRMSNorm(nn.Module):
    """RMSNorm exactly as Llama/Mistral/Qwen compute it (fp32 statistics, weight applied in the input dtype)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(dtype)


class TyrRotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE; the attribute names are the ones transformers' rope helpers and weight init expect."""

    def __init__(self, config: TyrConfig, device: torch.device | None = None):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        if self.rope_type == "default":
            inv_freq, self.attention_scaling = self.compute_default_rope_parameters(config, device)
        else:  # llama3, yarn, linear, dynamic, longrope: transformers' own implementations
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(
        config: TyrConfig,
        device: torch.device | str | None = None,
        seq_len: int | None = None,
        layer_type: str | None = None,
    ) -> tuple[torch.Tensor, float]:
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
        return 1.0 / (base**exponents), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, D); cos/sin: (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    implementation: str | None,
) -> torch.Tensor:
    """Attention of q (B, H, q, D) over k/v (B, H, k, D).

    ``mask`` is a boolean (B or 1, 1, q, k) tensor of allowed positions, or None for plain causal attention whose
    last query is the last key (the model passes None only where that holds).
    """
    q_len, k_len = q.shape[-2], k.shape[-2]
    if implementation == "eager":
        scores = (q @ k.transpose(-1, -2)) * scaling
        if mask is None:
            mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v
    # SDPA's is_causal aligns the mask top-left, which is right only when q_len == k_len (no cached tokens)
    causal = mask is None and q_len > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling)


class TyrAttention(nn.Module):
    """Self-attention over this layer's kept query heads and the KV heads they read."""

    def __init__(self, config: TyrConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = config.head_dim**-0.5
        self.n_heads = config.layer_heads[layer_idx]
        self.n_kv = config.layer_kv_heads[layer_idx]
        self.kv_map = list(config.layer_kv_map[layer_idx])  # a plain list, so weight loading never touches it
        self.sliding_window = config.layer_sliding_window[layer_idx]
        hidden, q_size, kv_size = config.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(hidden, q_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, hidden, bias=config.o_bias)
        if config.qk_norm:  # Qwen3: RMSNorm over head_dim, per head, before RoPE
            self.q_norm = TyrRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = TyrRMSNorm(self.head_dim, config.rms_norm_eps)
        self._kv_index: dict[torch.device, torch.Tensor] = {}

    def _expand_kv(self, kv: torch.Tensor) -> torch.Tensor:
        """(B, n_kv, T, D) -> (B, n_heads, T, D): each kept query head gets the KV head it reads."""
        if self.kv_map == list(range(self.n_heads)):
            return kv
        if kv.device not in self._kv_index:
            self._kv_index[kv.device] = torch.tensor(self.kv_map, dtype=torch.long, device=kv.device)
        return kv.index_select(1, self._kv_index[kv.device])

    def forward(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        masks: dict,
        past_key_values: DynamicCache | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.n_kv, self.head_dim).transpose(1, 2)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = _apply_rope(q.transpose(1, 2), cos, sin), _apply_rope(k.transpose(1, 2), cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        k, v = self._expand_kv(k), self._expand_kv(v)
        out = _attend(q, k, v, masks[self.sliding_window], self.scaling, self.config._attn_implementation)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim))


class TyrMLP(nn.Module):
    """Gated MLP over this layer's kept neurons."""

    def __init__(self, config: TyrConfig, layer_idx: int):
        super().__init__()
        hidden, width = config.hidden_size, config.layer_intermediate[layer_idx]
        self.gate_proj = nn.Linear(hidden, width, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, width, bias=config.mlp_bias)
        self.down_proj = nn.Linear(width, hidden, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TyrDecoderLayer(nn.Module):
    """Pre-norm residual block; a dropped sublayer adds nothing but its output bias (if the family has one)."""

    def __init__(self, config: TyrConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.has_attn = config.layer_heads[layer_idx] > 0
        self.has_mlp = config.layer_intermediate[layer_idx] > 0
        if self.has_attn:
            self.input_layernorm = TyrRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.self_attn = TyrAttention(config, layer_idx)
        elif config.o_bias:  # the masked model still adds o_proj's bias when every head is gone
            self.attn_output_bias = nn.Parameter(torch.zeros(config.hidden_size))
        if self.has_mlp:
            self.post_attention_layernorm = TyrRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = TyrMLP(config, layer_idx)
        elif config.mlp_bias:
            self.mlp_output_bias = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        masks: dict,
        past_key_values: DynamicCache | None = None,
    ) -> torch.Tensor:
        if self.has_attn:
            x = x + self.self_attn(self.input_layernorm(x), position_embeddings, masks, past_key_values)
        else:
            if past_key_values is not None:
                # A 1-number-per-token placeholder keeps this cache layer's sequence length right (transformers and
                # generate() read it from layer 0; an empty tensor would read as length 0)
                placeholder = x.new_zeros(x.shape[0], 1, x.shape[1], 1)
                past_key_values.update(placeholder, placeholder, self.layer_idx)
            if hasattr(self, "attn_output_bias"):
                x = x + self.attn_output_bias
        if self.has_mlp:
            x = x + self.mlp(self.post_attention_layernorm(x))
        elif hasattr(self, "mlp_output_bias"):
            x = x + self.mlp_output_bias
        return x


class TyrPreTrainedModel(PreTrainedModel):
    config_class = TyrConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TyrDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True


def _attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, past: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, q, k) mask of the keys each query may see; None when plain causal attention suffices."""
    k_len = past + q_len
    window_active = window is not None and window < k_len
    if attention_mask is None and not window_active and (past == 0 or q_len == 1):
        return None
    q_pos = torch.arange(past, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window_active:
        allowed = allowed & (k_pos > q_pos - window)  # transformers' sliding window: the last `window` tokens
    mask = allowed[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()
        # A padding query sees no key at all; SDPA then returns NaN, and the next layer spreads it to every token
        # through 0 * NaN. Letting every query see itself keeps padding rows finite and changes no real token.
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


class TyrModel(TyrPreTrainedModel):
    def __init__(self, config: TyrConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(TyrDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = TyrRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = TyrRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _masks(self, attention_mask: torch.Tensor | None, q_len: int, past: int, device: torch.device) -> dict:
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != past + q_len:
                raise ValueError(
                    f"attention_mask must be 2-D (batch, {past + q_len}) covering cached and new tokens, "
                    f"got shape {tuple(attention_mask.shape)}"
                )
            if bool(attention_mask.all()):
                attention_mask = None  # all ones: the fast causal path is exact
        windows = {layer.self_attn.sliding_window for layer in self.layers if layer.has_attn}
        return {w: _attention_mask(attention_mask, q_len, past, w, device) for w in windows}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(x.shape[1], device=x.device) + past)[None]
        position_embeddings = self.rotary_emb(x, position_ids)
        masks = self._masks(attention_mask, x.shape[1], past, x.device)
        hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            x = layer(x, position_embeddings, masks, past_key_values)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        )


class TyrForCausalLM(TyrPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TyrConfig):
        super().__init__(config)
        self.model = TyrModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep])
        loss = None
        if labels is not None:  # next-token loss, -100 ignored, as transformers' causal LMs compute it
            shifted = logits[:, :-1].flatten(0, 1).float()
            loss = F.cross_entropy(shifted, labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )
