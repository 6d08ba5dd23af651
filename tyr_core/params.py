"""Parameter accounting: dense, per layer, and what a pruned layout physically removes."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from .families import geometry
from .pruned import PrunedLayout


def _fixed(config: PretrainedConfig) -> int:
    """Embeddings, lm_head (once if tied) and norms: never pruned."""
    geo = geometry(config)
    emb = config.vocab_size * geo.hidden
    head = 0 if getattr(config, "tie_word_embeddings", False) else emb
    norms = geo.hidden * (2 * geo.num_layers + 1)
    if geo.family == "qwen3":
        norms += 2 * geo.head_dim * geo.num_layers
    return emb + head + norms


def dense_params(config: PretrainedConfig) -> dict:
    geo = geometry(config)
    per_layer = geo.dense_sublayer_params("attn") + geo.dense_sublayer_params("mlp")
    return {"total": _fixed(config) + geo.num_layers * per_layer, "prunable": geo.num_layers * per_layer}


def layout_params(config: PretrainedConfig, layout: PrunedLayout) -> dict:
    """Total and per-layer parameters that physically remain, and how many were removed."""
    geo = geometry(config)
    per_layer = []
    for layer in range(geo.num_layers):
        attn = geo.sublayer_params("attn", layout[(layer, "attn")].kept)
        mlp = geo.sublayer_params("mlp", layout[(layer, "mlp")].kept)
        per_layer.append({"attn": attn, "mlp": mlp})
    prunable = sum(p["attn"] + p["mlp"] for p in per_layer)
    dense = dense_params(config)
    return {
        "total": _fixed(config) + prunable,
        "prunable": prunable,
        "removed": dense["prunable"] - prunable,
        "removed_fraction": (dense["prunable"] - prunable) / dense["prunable"],
        "per_layer": per_layer,
    }


def count_module_params(model: nn.Module) -> int:
    """Parameters actually stored in a module (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
