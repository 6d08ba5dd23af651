"""The pruned layout: what survives in every sublayer. The supernet, the search and every exporter speak it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .keys import Kind


@dataclass(frozen=True)
class PrunedSublayer:
    """One sublayer after pruning.

    Attributes:
        kept: sorted int64 indices of the kept groups (query heads for ``attn``, neurons for ``mlp``).
        weight: the refitted output projection restricted to the kept input columns,
            shape ``(hidden, len(kept) * group_size)`` (``o_proj``: group_size = head_dim; ``down_proj``: 1).
            The input projections (q/k/v, gate/up) keep their dense values on the kept rows.
    """

    kept: torch.Tensor
    weight: torch.Tensor

    @property
    def removed_all(self) -> bool:
        return self.kept.numel() == 0


# (layer, kind) -> the chosen copy; a layout covers every sublayer of the model.
PrunedLayout = dict[tuple[int, Kind], PrunedSublayer]


def kept_columns(kept: torch.Tensor, group_size: int) -> torch.Tensor:
    """Input-column indices of the kept groups (``group_size`` contiguous columns per group)."""
    offsets = torch.arange(group_size, dtype=torch.long, device=kept.device)
    return (kept.long()[:, None] * group_size + offsets[None, :]).reshape(-1)


def scatter_columns(sub: PrunedSublayer, in_features: int, group_size: int) -> torch.Tensor:
    """The zero-filled full ``(hidden, in_features)`` weight of a pruned sublayer (the masked form)."""
    full = torch.zeros(sub.weight.shape[0], in_features, dtype=sub.weight.dtype, device=sub.weight.device)
    if not sub.removed_all:
        full[:, kept_columns(sub.kept, group_size)] = sub.weight
    return full


def full_layout(model: torch.nn.Module) -> PrunedLayout:
    """The layout that keeps everything, with the model's own output projections: exporting it writes the dense
    model through the same writer as a pruned one (a like-for-like baseline)."""
    layout: PrunedLayout = {}
    for layer, block in enumerate(model.model.layers):
        heads = block.self_attn.o_proj.weight.shape[1] // block.self_attn.head_dim
        neurons = block.mlp.down_proj.weight.shape[1]
        layout[(layer, "attn")] = PrunedSublayer(torch.arange(heads), block.self_attn.o_proj.weight.detach())
        layout[(layer, "mlp")] = PrunedSublayer(torch.arange(neurons), block.mlp.down_proj.weight.detach())
    return layout
