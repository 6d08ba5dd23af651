"""Config of a tyr-pruned Llama-family model: the dense model's config plus per-layer shapes.

Self-contained (imports only transformers): it is copied next to exported weights so that
``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` works where tyr is not installed.
"""

from transformers import PretrainedConfig


class TyrConfig(PretrainedConfig):
    """A Llama-family config whose layers each keep their own number of heads and MLP neurons.

    The dense shapes (``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``) are kept for reference
    and for RoPE; the modules are built from the per-layer lists:

    * ``layer_heads[i]``: query heads kept in layer ``i`` (0: attention dropped, residual only);
    * ``layer_kv_heads[i]``: KV heads kept (those read by at least one kept query head);
    * ``layer_kv_map[i][h]``: the kept KV head that kept query head ``h`` reads. GQA groups may have been pruned
      unevenly, so this is not ``h // (heads / kv_heads)`` in general;
    * ``layer_intermediate[i]``: MLP neurons kept (0: MLP dropped);
    * ``layer_sliding_window[i]``: attention window in tokens, or None for full causal attention (Mistral,
      Qwen2/3 sliding layers). Deliberately not named ``sliding_window``: transformers would then build
      window-truncated caches that this model's masks do not expect.

    A dropped sublayer keeps only its output bias, if the family has one (``o_bias`` / ``mlp_bias``), so that the
    compact model computes exactly what the masked dense model computes.
    """

    model_type = "tyr_llama"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 11008,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
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
        layer_sliding_window: list[int | None] | None = None,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.qkv_bias, self.o_bias, self.mlp_bias, self.qk_norm = qkv_bias, o_bias, mlp_bias, qk_norm
        self.source_model_type = source_model_type
        self.use_cache = use_cache
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        n = num_hidden_layers
        group = self.num_attention_heads // self.num_key_value_heads
        self.layer_heads = list(layer_heads) if layer_heads is not None else [num_attention_heads] * n
        self.layer_kv_heads = list(layer_kv_heads) if layer_kv_heads is not None else [self.num_key_value_heads] * n
        self.layer_kv_map = (
            [list(m) for m in layer_kv_map]
            if layer_kv_map is not None
            else [[h // group for h in range(num_attention_heads)] for _ in range(n)]
        )
        self.layer_intermediate = [intermediate_size] * n if layer_intermediate is None else list(layer_intermediate)
        self.layer_sliding_window = [None] * n if layer_sliding_window is None else list(layer_sliding_window)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._check_layers()

    def _check_layers(self) -> None:
        """Reject per-layer lists that cannot describe a model (a wrong list would fail later, obscurely)."""
        n = self.num_hidden_layers
        for name in ("layer_heads", "layer_kv_heads", "layer_kv_map", "layer_intermediate", "layer_sliding_window"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} layers")
        per_layer = zip(self.layer_heads, self.layer_kv_heads, self.layer_kv_map, strict=True)
        for i, (heads, kv_heads, kv_map) in enumerate(per_layer):
            if len(kv_map) != heads:
                raise ValueError(f"layer {i}: layer_kv_map has {len(kv_map)} entries for {heads} query heads")
            if sorted(set(kv_map)) != list(range(kv_heads)):
                raise ValueError(f"layer {i}: layer_kv_map {kv_map} must use each of the {kv_heads} KV heads")
