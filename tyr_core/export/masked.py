"""Masked dense export: the standard architecture with pruned groups zeroed; loads anywhere, no speed-up."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..families import geometry
from ..pruned import PrunedLayout, kept_columns, scatter_columns
from .compact import _atomic_save


def _zero_rows_except(lin: nn.Linear, keep: torch.Tensor) -> None:
    mask = torch.zeros(lin.out_features, dtype=torch.bool)
    mask[keep] = True
    lin.weight[~mask] = 0
    if lin.bias is not None:
        lin.bias[~mask] = 0


def masked_model(model: nn.Module, layout: PrunedLayout) -> nn.Module:
    """A copy of ``model`` whose removed heads/neurons are zero in every projection and whose output
    projections carry the refitted weights."""
    geo = geometry(model.config)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for layer, block in enumerate(out.model.layers):
            attn, mlp = layout[(layer, "attn")], layout[(layer, "mlp")]
            sa = block.self_attn
            sa.o_proj.weight.copy_(scatter_columns(attn, sa.o_proj.in_features, geo.head_dim))
            _zero_rows_except(sa.q_proj, kept_columns(attn.kept, geo.head_dim))
            kv = torch.tensor(sorted(set((attn.kept.long() // geo.heads_per_kv).tolist())), dtype=torch.long)
            for proj in (sa.k_proj, sa.v_proj):
                _zero_rows_except(proj, kept_columns(kv, geo.head_dim))
            block.mlp.down_proj.weight.copy_(scatter_columns(mlp, block.mlp.down_proj.in_features, 1))
            for proj in (block.mlp.gate_proj, block.mlp.up_proj):
                _zero_rows_except(proj, mlp.kept.long())
    return out


def save_masked(model: nn.Module, layout: PrunedLayout, out_dir: Path, tokenizer=None) -> Path:
    masked = masked_model(model, layout)

    def write(tmp: Path) -> None:
        masked.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return _atomic_save(Path(out_dir), write)
