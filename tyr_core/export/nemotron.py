"""vLLM's Nemotron-NAS format (``DeciLMForCausalLM``, ``model_type: nemotron-nas``, per-layer ``block_configs``).

What the format can say, read in vLLM's ``model_executor/models/nemotron_nas.py``:

* attention per layer is either ``no_op`` (the block and its ``input_layernorm`` vanish) or an attention with
  the *global* ``num_attention_heads`` query heads and ``num_attention_heads // n_heads_in_group`` KV heads. The
  query-head count cannot vary per layer, so a layer that keeps some but not all of its query heads (even whole
  KV groups of them) cannot be written: we refuse it naming the layer, rather than padding heads with zeros;
* the FFN per layer is ``no_op`` or a gated MLP of width ``ffn_mult`` (vLLM: ``round_up(int(2*ffn_mult*hidden/3),
  256)``, a multiple of 256) or, when the block config object has no ``ffn_mult`` attribute at all, the exact
  ``intermediate_size``. NVIDIA's hub ``block_config.py`` always defines ``ffn_mult`` (asserts it for every
  active FFN and drops unknown fields such as ``intermediate_size``), so exact widths need a config class that
  leaves it out. vLLM has no config class of its own for ``nemotron-nas`` and loads the one the checkpoint ships
  (``trust_remote_code``), so we ship ours (``configuration_decilm.py``, written by this module). With
  ``ffn_width="ffn_mult"`` we write ``ffn_mult`` instead, for NVIDIA's classes, and refuse widths it cannot hit;
* biases: ``attention_bias`` (q/k/v/o), overridden for q/k/v by ``qkv_bias`` (Qwen2: q/k/v only); ``mlp_bias``.
  No per-head q/k norm (Qwen3 is refused), no sliding window (an active one is refused), SiLU only.

vLLM also fails on two layouts the format itself allows: every attention ``no_op`` (it sizes the KV cache from
the first attention block), and a first non-empty block whose attention is ``no_op`` but FFN is not (its decoder
layer unpacks the residual stream before any exists). ``validate_nemotron`` checks those too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import ExportError
from ..families import Geometry, geometry
from ..sublayer_layout import PrunedLayout
from .compact import atomic_write, check_layout, compact_state_dict

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

FfnWidth = Literal["exact", "ffn_mult"]
ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
CONFIG_FILE = "configuration_decilm.py"
SHARD_BYTES = 5 * 2**30  # shard size of transformers' save_pretrained

# The config class shipped with the checkpoint. Its block entries carry exactly the keys of config.json, so vLLM's
# `hasattr(ffn, "ffn_mult")` is False for an exact-width FFN and it reads `ffn.intermediate_size`.
CONFIG_SOURCE = '''"""Nemotron-NAS (DeciLM) config written by tyr: Llama keys plus per-layer ``block_configs``."""

from transformers import PretrainedConfig


class BlockEntry:
    """Attribute view of one ``block_configs`` entry (or its attention/ffn part), holding only the keys given."""

    def __init__(self, **fields):
        for key, value in fields.items():
            setattr(self, key, BlockEntry(**value) if isinstance(value, dict) else value)

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, BlockEntry) else v for k, v in vars(self).items()}

    def __repr__(self):
        return f"BlockEntry({self.to_dict()})"


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, rope_parameters=None, **kwargs):
        self.block_configs = [b if isinstance(b, BlockEntry) else BlockEntry(**b) for b in (block_configs or [])]
        self.rope_parameters = rope_parameters
        super().__init__(**kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out
'''


def ffn_mult_width(ffn_mult: float, hidden: int) -> int:
    """The FFN width vLLM (and NVIDIA's DeciLM code) derive from ``ffn_mult``: a multiple of 256."""
    width = int(2 * ffn_mult * hidden / 3)
    return width if width % 256 == 0 else width + 256 - width % 256


def _ffn_mult_for(width: int, hidden: int) -> float | None:
    """An ``ffn_mult`` (6 decimals, as NVIDIA's config class rounds it) giving exactly ``width``, or None."""
    mult = round(3 * width / (2 * hidden), 6)
    return mult if ffn_mult_width(mult, hidden) == width else None


def check_deci_model(config: PretrainedConfig, geo: Geometry, fmt: str, engine: str) -> None:
    """What both DeciLM-style formats (Nemotron-NAS for vLLM, llama.cpp's ``deci``) cannot run: Qwen3's per-head
    q/k norms, MLPs other than SiLU, and sliding-window attention.

    Raises:
        ExportError: naming ``fmt``, the model's feature and the export to use instead.
    """
    if geo.family == "qwen3":
        raise ExportError(
            f"{fmt} cannot express Qwen3: {engine} has no per-head q/k RMSNorm in its attention; use the compact export"
        )
    if config.hidden_act != "silu":
        raise ExportError(f"{fmt} supports SiLU MLPs only ({engine}), not {config.hidden_act!r}")
    windows = [layer for layer, w in enumerate(_source_windows(config)) if w is not None]
    if windows:
        raise ExportError(
            f"{fmt} cannot express sliding-window attention (layers {windows} use a "
            f"{config.sliding_window}-token window below max_position_embeddings); use the compact export"
        )


def _source_windows(config: PretrainedConfig) -> list[int | None]:
    """Layers whose sliding window actually limits attention (a window >= the context length never does)."""
    window = getattr(config, "sliding_window", None)
    if window is None or window >= config.max_position_embeddings:
        return [None] * config.num_hidden_layers
    kinds = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in kinds]


def _attention_block(geo: Geometry, layer: int, kept: torch.Tensor) -> dict:
    heads = int(kept.numel())
    if heads == geo.heads:
        return {"no_op": False, "n_heads_in_group": geo.heads_per_kv}
    if heads == 0:
        if geo.o_bias:
            raise ExportError(
                f"nemotron-nas cannot express layer {layer}: its attention is removed but o_proj's bias still adds "
                "a constant, and a no_op block adds nothing; use the compact export"
            )
        return {"no_op": True}
    per_group = torch.bincount(kept.long() // geo.heads_per_kv, minlength=geo.kv_heads).tolist()
    shape = "unevenly across" if len(set(c for c in per_group if c)) > 1 else "in whole or equal parts of"
    raise ExportError(
        f"nemotron-nas cannot express layer {layer}: its attention keeps {heads} of {geo.heads} query heads "
        f"({shape} KV groups: kept heads per KV group {per_group}), but the format gives every non-no_op "
        f"attention all num_attention_heads={geo.heads} query heads (only n_heads_in_group varies per layer); "
        "use the compact (or masked) export, or prune with search.attention=whole (the serve-vllm recipe), under "
        "which every attention keeps all its heads or none"
    )


def _ffn_block(geo: Geometry, layer: int, width: int, ffn_width: FfnWidth) -> dict:
    if width == 0:
        if geo.mlp_bias:
            raise ExportError(
                f"nemotron-nas cannot express layer {layer}: its MLP is removed but down_proj's bias still adds a "
                "constant, and a no_op block adds nothing; use the compact export"
            )
        return {"no_op": True}
    if ffn_width == "exact":
        return {"no_op": False, "intermediate_size": width}
    mult = _ffn_mult_for(width, geo.hidden)
    if mult is None:
        raise ExportError(
            f"nemotron-nas with ffn_mult cannot express layer {layer}: it keeps {width} MLP neurons, but ffn_mult "
            f"widths are round_up(int(2*ffn_mult*{geo.hidden}/3), 256), multiples of 256; use ffn_width='exact' "
            "(our shipped config class) or the compact export"
        )
    return {"no_op": False, "ffn_mult": mult}


def _global_keys(config: PretrainedConfig, geo: Geometry) -> dict:
    rope = dict(config.rope_parameters)
    scaled = rope.get("rope_type", "default") != "default"
    legacy_scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if scaled else None
    dtype = getattr(config, "dtype", None)
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": geo.hidden,
        "num_hidden_layers": geo.num_layers,
        "num_attention_heads": geo.heads,
        "head_dim": geo.head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": getattr(config, "initializer_range", 0.02),
        # rope_parameters for current vLLM/transformers, rope_theta/rope_scaling for older readers
        "rope_parameters": rope,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": legacy_scaling,
        # vLLM: attention_bias sets q/k/v/o biases, qkv_bias then overrides q/k/v (Qwen2: q/k/v only)
        "attention_bias": geo.o_bias,
        "qkv_bias": geo.qkv_bias,
        "mlp_bias": geo.mlp_bias,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
    }


def nemotron_config(config: PretrainedConfig, layout: PrunedLayout, ffn_width: FfnWidth = "exact") -> dict:
    """The ``config.json`` of a Nemotron-NAS checkpoint of ``layout``, validated against the format's rules.

    Args:
        config: the dense model's config (Llama, Mistral or Qwen2).
        layout: the kept groups of every sublayer.
        ffn_width: ``"exact"`` writes ``ffn.intermediate_size`` (needs the shipped ``configuration_decilm.py``);
            ``"ffn_mult"`` writes ``ffn.ffn_mult`` (NVIDIA's config classes) and refuses widths that are not
            multiples of 256.

    Returns:
        The config as a JSON-serialisable dict (``architectures``, ``model_type``, ``auto_map``, Llama keys,
        ``block_configs``).

    Raises:
        ExportError: naming the layer and the reason when the layout or the model cannot be expressed.
        UnsupportedModelError: the config is not a supported family.
    """
    geo = geometry(config)
    check_layout(geo, layout)
    check_deci_model(config, geo, "nemotron-nas", "vLLM's DeciLM")
    blocks = [
        {
            "attention": _attention_block(geo, layer, layout[(layer, "attn")].kept),
            "ffn": _ffn_block(geo, layer, int(layout[(layer, "mlp")].kept.numel()), ffn_width),
        }
        for layer in range(geo.num_layers)
    ]
    cfg = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": f"{CONFIG_FILE.removesuffix('.py')}.DeciLMConfig"},
        **_global_keys(config, geo),
        "block_configs": blocks,
    }
    validate_nemotron(cfg)
    return cfg


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_attention(layer: int, attn: dict, heads: int) -> None:
    if not isinstance(attn.get("no_op"), bool):
        raise ExportError(f"layer {layer}: attention.no_op must be true or false")
    if attn.get("replace_with_linear"):
        raise ExportError(f"layer {layer}: attention.replace_with_linear is not implemented by vLLM's nemotron_nas")
    if not attn["no_op"]:
        group = attn.get("n_heads_in_group")
        if not _positive_int(group) or heads % group:
            raise ExportError(
                f"layer {layer}: attention.n_heads_in_group must be a positive divisor of num_attention_heads="
                f"{heads}, got {group!r}"
            )


def _check_ffn(layer: int, ffn: dict) -> None:
    if not isinstance(ffn.get("no_op"), bool):
        raise ExportError(f"layer {layer}: ffn.no_op must be true or false")
    if ffn.get("replace_with_linear"):
        raise ExportError(f"layer {layer}: ffn.replace_with_linear is not implemented by vLLM's nemotron_nas")
    if ffn.get("hidden_act", "silu") != "silu":
        raise ExportError(f"layer {layer}: ffn.hidden_act must be silu (vLLM's LlamaMLP), got {ffn['hidden_act']!r}")
    if ffn["no_op"]:
        return
    has_mult, has_size = "ffn_mult" in ffn, "intermediate_size" in ffn
    if has_mult == has_size:
        raise ExportError(f"layer {layer}: an active ffn needs exactly one of ffn_mult and intermediate_size")
    if has_size and not _positive_int(ffn["intermediate_size"]):
        raise ExportError(f"layer {layer}: ffn.intermediate_size must be a positive integer")
    if has_mult and not (isinstance(ffn["ffn_mult"], int | float) and ffn["ffn_mult"] > 0):
        raise ExportError(f"layer {layer}: ffn.ffn_mult must be a positive number")


def _check_globals(cfg: dict) -> None:
    if cfg.get("architectures") != [ARCHITECTURE] or cfg.get("model_type") != MODEL_TYPE:
        raise ExportError(f"architectures must be [{ARCHITECTURE!r}] and model_type {MODEL_TYPE!r}")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if not _positive_int(cfg.get(key)):
            raise ExportError(f"{key} must be a positive integer, got {cfg.get(key)!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act must be silu (vLLM's LlamaMLP), got {cfg['hidden_act']!r}")


def _check_blocks(cfg: dict) -> list[dict]:
    blocks = cfg.get("block_configs")
    if not isinstance(blocks, list) or len(blocks) != cfg["num_hidden_layers"]:
        count = len(blocks) if isinstance(blocks, list) else None
        raise ExportError(f"block_configs must list one block per layer: {count} for {cfg['num_hidden_layers']}")
    for layer, block in enumerate(blocks):
        if not isinstance(block, dict) or set(block) != {"attention", "ffn"}:
            raise ExportError(f"layer {layer}: a block is {{'attention': ..., 'ffn': ...}}, got {block!r}")
        _check_attention(layer, block["attention"], cfg["num_attention_heads"])
        _check_ffn(layer, block["ffn"])
    return blocks


def validate_nemotron(cfg: dict) -> None:
    """Check a Nemotron-NAS config dict against the format's rules and vLLM's loading constraints.

    Rules: the architecture and model type; positive global sizes; one ``{"attention", "ffn"}`` block per layer;
    attention is ``no_op`` or has an ``n_heads_in_group`` dividing ``num_attention_heads``; an active FFN has
    exactly one of ``ffn_mult`` / ``intermediate_size``; no ``replace_with_linear``; SiLU; at least one active
    attention; the first block that is not entirely ``no_op`` keeps its attention.

    Raises:
        ExportError: naming the layer (or key) and the rule it breaks.
    """
    _check_globals(cfg)
    blocks = _check_blocks(cfg)
    active = [not b["attention"]["no_op"] for b in blocks]
    if not any(active):
        raise ExportError("every attention block is no_op: vLLM sizes its KV cache from the first attention block")
    first = next(i for i, b in enumerate(blocks) if not (b["attention"]["no_op"] and b["ffn"]["no_op"]))
    if not active[first]:
        raise ExportError(
            f"layer {first}: the first non-empty block has a no_op attention but an active ffn, which vLLM's "
            "DeciLM decoder layer cannot run (no residual stream exists yet)"
        )


def _shards(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.cpu()
        size += nbytes
    return shards


def _write_weights(state: dict[str, torch.Tensor], folder: Path) -> None:
    """Safetensors in transformers' layout: one ``model.safetensors``, or shards plus an index above 5 GiB."""
    shards = _shards(state)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_nemotron(
    model: nn.Module,
    layout: PrunedLayout,
    out_dir: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    ffn_width: FfnWidth = "exact",
) -> Path:
    """Write a Nemotron-NAS checkpoint for vLLM: config.json, ``configuration_decilm.py``, safetensors weights.

    Weights keep Llama's names; a no_op block has no tensors (not even its norm); kept layers have all query heads,
    ``num_attention_heads // n_heads_in_group`` KV heads and the exact kept MLP rows/columns (refitted
    down_proj). ``lm_head`` is left out when tied. The write is atomic (see ``atomic_write``).

    Args:
        model: the dense model (Llama, Mistral or Qwen2).
        layout: the kept groups and refitted output projections of every sublayer.
        out_dir: the folder to create or replace.
        tokenizer: saved alongside when given.
        ffn_width: see ``nemotron_config``.

    Returns:
        ``out_dir``.

    Raises:
        ExportError: naming the layer and the reason when the layout cannot be expressed.
    """
    cfg = nemotron_config(model.config, layout, ffn_width)
    state = compact_state_dict(model, layout)
    if cfg["tie_word_embeddings"]:
        state.pop("lm_head.weight")
    cfg["torch_dtype"] = str(state["model.embed_tokens.weight"].dtype).removeprefix("torch.")

    def write(tmp: Path) -> None:
        _write_weights(state, tmp)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / CONFIG_FILE).write_text(CONFIG_SOURCE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_write(Path(out_dir), write)
