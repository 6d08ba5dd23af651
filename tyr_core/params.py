"""Parameter accounting: dense, per layer, and what a pruned layout physically removes."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from .families import geometry
from .pruned import PrunedLayout


def _fixed(config: PretrainedConfig) -> int:
    """Embeddings, lm_head (once if tied) and the final norm: never pruned."""
    geo = geometry(config)
    emb = config.vocab_size * geo.hidden
    head = 0 if getattr(config, "tie_word_embeddings", False) else emb
    return emb + head + geo.hidden


def _sublayer_total(geo, kind, kept) -> int:
    """A sublayer's projections plus its norms (which go with it when the whole sublayer is dropped)."""
    if kept.numel() == 0:
        return 0
    norms = geo.hidden + (2 * geo.head_dim if kind == "attn" and geo.family == "qwen3" else 0)
    return geo.sublayer_params(kind, kept) + norms


def dense_params(config: PretrainedConfig) -> dict:
    geo = geometry(config)
    per_layer = sum(_sublayer_total(geo, k, torch.arange(geo.groups(k))) for k in ("attn", "mlp"))
    return {"total": _fixed(config) + geo.num_layers * per_layer, "prunable": geo.num_layers * per_layer}


def layout_params(config: PretrainedConfig, layout: PrunedLayout) -> dict:
    """Total and per-layer parameters that physically remain (norms of dropped sublayers go too), and how many
    were removed."""
    geo = geometry(config)
    per_layer = [
        {kind: _sublayer_total(geo, kind, layout[(layer, kind)].kept) for kind in ("attn", "mlp")}
        for layer in range(geo.num_layers)
    ]
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
