"""Masked dense export: the standard architecture with pruned groups zeroed. Loads anywhere; no speed-up.

This is the model the search evaluated (refitted o_proj/down_proj with zero columns, docs/algorithm.md), with the
input-projection rows of removed groups zeroed as well so that the checkpoint shows what is gone. Those rows only
feed zero columns, so zeroing them changes nothing: Qwen2's q/k/v biases of a removed head reach the output only
through o_proj's zero columns. Output biases (o_proj/down_proj, where a family has them) are kept, as in the search.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..families import geometry
from ..sublayer_layout import PrunedLayout, PrunedSublayer, kept_columns, scatter_columns
from .compact import atomic_write, check_layout, kept_kv_heads

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _zero_rows_except(lin: nn.Linear, keep: torch.Tensor) -> None:
    removed = torch.ones(lin.out_features, dtype=torch.bool, device=lin.weight.device)
    removed[keep.to(lin.weight.device)] = False
    lin.weight[removed] = 0
    if lin.bias is not None:
        lin.bias[removed] = 0


def _set_output_weight(lin: nn.Linear, sub: PrunedSublayer, group_size: int) -> None:
    lin.weight.copy_(scatter_columns(sub, lin.in_features, group_size).to(lin.weight.device))


def masked_model(model: nn.Module, layout: PrunedLayout) -> nn.Module:
    """A deep copy of ``model`` in which every removed head and neuron is zero in every projection.

    o_proj/down_proj carry the refitted weights on the kept columns and zeros elsewhere; q/k/v rows of removed
    query heads (k/v: of KV heads no kept query head reads) and gate/up rows of removed neurons are zeroed.

    Args:
        model: the dense model (Llama, Mistral, Qwen2 or Qwen3 causal LM); left unchanged.
        layout: the kept groups and refitted output projections of every sublayer.

    Returns:
        The masked copy, same class and shapes as ``model``.

    Raises:
        UnsupportedModelError: the model is not a supported family.
        ExportError: the layout does not fit the model.
    """
    geo = geometry(model.config)
    check_layout(geo, layout)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for layer, block in enumerate(out.model.layers):
            attn, mlp = layout[(layer, "attn")], layout[(layer, "mlp")]
            sa = block.self_attn
            _set_output_weight(sa.o_proj, attn, geo.head_dim)
            _zero_rows_except(sa.q_proj, kept_columns(attn.kept, geo.head_dim))
            kv_rows = kept_columns(kept_kv_heads(geo, attn.kept), geo.head_dim)
            _zero_rows_except(sa.k_proj, kv_rows)
            _zero_rows_except(sa.v_proj, kv_rows)
            _set_output_weight(block.mlp.down_proj, mlp, 1)
            _zero_rows_except(block.mlp.gate_proj, mlp.kept.long())
            _zero_rows_except(block.mlp.up_proj, mlp.kept.long())
    return out


def save_masked(
    model: nn.Module, layout: PrunedLayout, out_dir: Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Write the masked model as a standard checkpoint (``save_pretrained``, safetensors), atomically.

    Args:
        model: the dense model; left unchanged.
        layout: the kept groups and refitted output projections of every sublayer.
        out_dir: the folder to create or replace.
        tokenizer: saved alongside when given.

    Returns:
        ``out_dir``.

    Raises:
        UnsupportedModelError: the model is not a supported family.
        ExportError: the layout does not fit the model.
    """
    masked = masked_model(model, layout)

    def write(tmp: Path) -> None:
        masked.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_write(Path(out_dir), write)
