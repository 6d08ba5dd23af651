"""vLLM's Nemotron-NAS format (``DeciLMForCausalLM``, ``model_type: nemotron-nas``, per-layer ``block_configs``).

What the format can express (vLLM ``nemotron_nas.py``): per layer, attention kept whole or dropped (``no_op``) —
the query-head count is global —, and an MLP of exact width (``ffn.intermediate_size``) or dropped. Layouts that
prune some query heads of a layer cannot be written; we refuse them naming the layer rather than padding.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..errors import ExportError
from ..families import geometry
from ..pruned import PrunedLayout
from .compact import _atomic_save, compact_state_dict


def nemotron_config(config, layout: PrunedLayout) -> dict:
    """The config dict, or ``ExportError`` naming the first layer the format cannot express."""
    geo = geometry(config)
    if geo.family not in ("llama", "mistral") or geo.qkv_bias or geo.o_bias or geo.mlp_bias:
        raise ExportError(f"nemotron-nas export supports bias-free Llama/Mistral models, not {geo.family!r}")
    blocks = []
    for layer in range(geo.num_layers):
        heads = int(layout[(layer, "attn")].kept.numel())
        if heads not in (0, geo.heads):
            raise ExportError(
                f"nemotron-nas cannot express layer {layer}: it keeps {heads} of {geo.heads} query heads, and the "
                "format only allows a layer's attention whole or removed; use --format compact (or masked)"
            )
        width = int(layout[(layer, "mlp")].kept.numel())
        attention = {"no_op": True} if heads == 0 else {"no_op": False, "n_heads_in_group": geo.heads_per_kv}
        ffn = {"no_op": True} if width == 0 else {"no_op": False, "intermediate_size": width}
        blocks.append({"attention": attention, "ffn": ffn})
    out = {k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type", "auto_map")}
    out |= {"architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "block_configs": blocks}
    validate_nemotron(out)
    return out


def validate_nemotron(cfg: dict) -> None:
    """The format's own rules: one block per layer, valid attention and FFN entries."""
    blocks = cfg.get("block_configs", [])
    if len(blocks) != cfg["num_hidden_layers"]:
        raise ExportError(f"block_configs has {len(blocks)} entries for {cfg['num_hidden_layers']} layers")
    for i, block in enumerate(blocks):
        attn, ffn = block["attention"], block["ffn"]
        if not attn["no_op"] and cfg["num_attention_heads"] % attn["n_heads_in_group"]:
            raise ExportError(f"layer {i}: n_heads_in_group must divide num_attention_heads")
        if not ffn["no_op"] and not (isinstance(ffn.get("intermediate_size"), int) and ffn["intermediate_size"] > 0):
            raise ExportError(f"layer {i}: ffn.intermediate_size must be a positive integer")
        if "replace_with_linear" in attn or "replace_with_linear" in ffn:
            raise ExportError(f"layer {i}: replace_with_linear is not supported by vLLM's nemotron_nas")


def save_nemotron(model: nn.Module, layout: PrunedLayout, out_dir: Path, tokenizer=None) -> Path:
    cfg = nemotron_config(model.config, layout)
    state = compact_state_dict(model, layout)  # kept rows/columns under Llama's standard names

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        if cfg.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return _atomic_save(Path(out_dir), write)
