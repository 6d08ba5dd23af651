"""Config of a tyr-pruned Llama-family model: the dense config plus per-layer shapes.

Self-contained (imports only transformers): copied next to exported weights for ``trust_remote_code`` loading.
"""

from transformers import PretrainedConfig


class TyrConfig(PretrainedConfig):
    """Per layer: ``layer_heads`` kept query heads, ``layer_kv_heads`` kept KV heads, ``layer_kv_map`` the kept
    KV head each kept query head reads (GQA groups may be pruned unevenly), ``layer_intermediate`` kept neurons.
    Zero heads or zero neurons mean the sublayer is dropped (residual only)."""

    model_type = "tyr_llama"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 32,
        head_dim: int = 128,
        intermediate_size: int = 11008,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 4096,
        rope_parameters: dict | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        source_model_type: str = "llama",
        layer_heads: list[int] | None = None,
        layer_kv_heads: list[int] | None = None,
        layer_kv_map: list[list[int]] | None = None,
        layer_intermediate: list[int] | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.qkv_bias, self.o_bias, self.mlp_bias, self.qk_norm = qkv_bias, o_bias, mlp_bias, qk_norm
        self.source_model_type = source_model_type
        n = num_hidden_layers
        self.layer_heads = layer_heads if layer_heads is not None else [num_attention_heads] * n
        self.layer_kv_heads = layer_kv_heads if layer_kv_heads is not None else [num_key_value_heads] * n
        group = max(1, num_attention_heads // max(1, num_key_value_heads))
        self.layer_kv_map = layer_kv_map or [[h // group for h in range(num_attention_heads)] for _ in range(n)]
        self.layer_intermediate = layer_intermediate if layer_intermediate is not None else [intermediate_size] * n
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
