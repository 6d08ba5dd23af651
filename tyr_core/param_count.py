"""Parameter accounting: the dense model, what a pruned layout physically keeps per layer, and what it removes.

Counts match the modules of the compact export (``tyr_core.export.build_compact_model``) exactly: q/k/v/o with
the KV heads the kept query heads read (GQA), q/k/v/o biases where the family has them (Qwen2: q/k/v), Qwen3's
per-head q/k norms, gate/up/down (+ biases), each sublayer's RMSNorm, embeddings, ``lm_head`` (once if tied) and
the final norm. A dropped sublayer loses its norm and weights and keeps only its output bias, if any.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from .families import Geometry, geometry
from .sublayer_layout import PrunedLayout


def attention_params(geo: Geometry, kept_heads: torch.Tensor) -> int:
    """Parameters of one attention sublayer keeping ``kept_heads`` (query-head indices), its norm included."""
    heads = int(kept_heads.numel())
    if heads == 0:
        return geo.hidden if geo.o_bias else 0
    q = heads * geo.head_dim
    kv = geo.kv_kept(kept_heads) * geo.head_dim
    weights = geo.hidden * (q + 2 * kv) + q * geo.hidden
    biases = (q + 2 * kv if geo.qkv_bias else 0) + (geo.hidden if geo.o_bias else 0)
    norms = geo.hidden + (2 * geo.head_dim if geo.family == "qwen3" else 0)
    return weights + biases + norms


def mlp_params(geo: Geometry, neurons: int) -> int:
    """Parameters of one MLP sublayer keeping ``neurons`` intermediate neurons, its norm included."""
    if neurons == 0:
        return geo.hidden if geo.mlp_bias else 0
    biases = 2 * neurons + geo.hidden if geo.mlp_bias else 0
    return 3 * geo.hidden * neurons + biases + geo.hidden


def _fixed(config: PretrainedConfig, geo: Geometry) -> dict[str, int]:
    """Never pruned: embeddings, lm_head (0 when tied to them) and the final norm."""
    embeddings = config.vocab_size * geo.hidden
    lm_head = 0 if getattr(config, "tie_word_embeddings", False) else embeddings
    return {"embeddings": embeddings, "lm_head": lm_head, "final_norm": geo.hidden}


def _layer(geo: Geometry, kept_heads: torch.Tensor, neurons: int) -> dict[str, int]:
    return {"attn": attention_params(geo, kept_heads), "mlp": mlp_params(geo, neurons)}


def dense_params(config: PretrainedConfig) -> dict:
    """Parameters of the dense model.

    Args:
        config: a Llama / Mistral / Qwen2 / Qwen3 config.

    Returns:
        ``total``, ``prunable`` (all decoder layers, norms included), ``embeddings``, ``lm_head``, ``final_norm``
        and ``per_layer`` (``{"attn", "mlp"}`` per layer).

    Raises:
        UnsupportedModelError: the config is not a supported family.
    """
    geo = geometry(config)
    layer = _layer(geo, torch.arange(geo.heads), geo.intermediate)
    per_layer = [dict(layer) for _ in range(geo.num_layers)]
    fixed = _fixed(config, geo)
    prunable = geo.num_layers * (layer["attn"] + layer["mlp"])
    return {"total": sum(fixed.values()) + prunable, "prunable": prunable, **fixed, "per_layer": per_layer}


def layout_params(config: PretrainedConfig, layout: PrunedLayout) -> dict:
    """Parameters that physically remain after pruning with ``layout`` (the compact export's count).

    Args:
        config: the dense model's config.
        layout: the kept groups of every sublayer.

    Returns:
        ``total``; ``prunable`` (decoder layers); ``removed`` and ``removed_fraction`` (of the dense decoder
        layers' parameters, norms included); ``dense_total``; ``embeddings``, ``lm_head``, ``final_norm``; and
        ``per_layer`` (``{"attn", "mlp"}`` per layer).

    Raises:
        UnsupportedModelError: the config is not a supported family.
        KeyError: the layout lacks a sublayer.
    """
    geo = geometry(config)
    per_layer = [
        _layer(geo, layout[(layer, "attn")].kept.long(), int(layout[(layer, "mlp")].kept.numel()))
        for layer in range(geo.num_layers)
    ]
    prunable = sum(p["attn"] + p["mlp"] for p in per_layer)
    dense = dense_params(config)
    fixed = _fixed(config, geo)
    return {
        "total": sum(fixed.values()) + prunable,
        "prunable": prunable,
        "removed": dense["prunable"] - prunable,
        "removed_fraction": (dense["prunable"] - prunable) / dense["prunable"],
        "dense_total": dense["total"],
        **fixed,
        "per_layer": per_layer,
    }


def count_module_params(model: nn.Module) -> int:
    """Parameters actually stored in ``model`` (a tensor shared by tied modules is counted once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def decoder_params(geo: Geometry) -> int:
    """Parameters of the dense decoder layers, norms included: the denominator of ``removed_fraction``."""
    return geo.num_layers * (attention_params(geo, torch.arange(geo.heads)) + mlp_params(geo, geo.intermediate))


def copy_params(geo: Geometry, kind: str, weight_params: int, groups_kept: int) -> int:
    """What one supernet copy keeps, counted as ``layout_params`` counts it, from its index entry's ``params``
    (``Geometry.sublayer_params``: weights and biases, KV heads included) and ``groups_kept``.

    The entry leaves out the sublayer's norms, which go with the sublayer's last group, and a removed attention's
    o_proj bias, which stays."""
    if kind == "attn":
        if groups_kept == 0:
            return attention_params(geo, torch.zeros(0, dtype=torch.long))
        return weight_params + geo.hidden + (2 * geo.head_dim if geo.family == "qwen3" else 0)
    return weight_params + (geo.hidden if groups_kept else 0)
