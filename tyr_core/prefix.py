"""Candidate forwards that share the layers a candidate has in common with the search parent.

Offspring differ from their parent in 2-8 sublayers (1-4 sparsity shifts). Every layer before the first one a
candidate changes computes exactly what the parent computes, so the parent's hidden states at each layer
boundary are cached per minibatch and a candidate's forward starts at its first changed layer. The saving is
measured in ``bench/quality.py`` (``prefix_sharing``); results are identical to a full forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .grid import Sublayer


class PrefixForward:
    """Logits of a resident HF causal LM whose current weights are the candidate's, reusing the reference
    candidate's hidden states for the unchanged prefix of layers.

    Args:
        model: the resident model (its output projections are swapped by ``SupernetModel.apply``).
        sublayers: the genes, giving each level's layer.
        budget_bytes: largest cache of hidden states kept; above it, forwards are computed in full.
    """

    def __init__(self, model: nn.Module, sublayers: list[Sublayer], budget_bytes: int = 2 << 30):
        self.model = model
        self.layer_of = [s.layer for s in sublayers]
        self.budget_bytes = budget_bytes
        self.reference: list[int] | None = None
        self._key: tuple | None = None
        self._hidden: list[torch.Tensor] = []
        self._pos: tuple[torch.Tensor, torch.Tensor] | None = None
        self.layers_run = 0
        self.layers_full = 0

    def set_reference(self, levels: list[int]) -> None:
        """The candidate whose hidden states are cached (the search parent); clears the cache if it changed."""
        if levels != self.reference:
            self.reference, self._key, self._hidden = list(levels), None, []

    def first_changed_layer(self, levels: list[int]) -> int:
        if self.reference is None:
            return 0
        changed = [self.layer_of[i] for i, (a, b) in enumerate(zip(levels, self.reference, strict=True)) if a != b]
        return min(changed, default=len(self.model.model.layers))

    def logits(self, input_ids: torch.Tensor, levels: list[int]) -> torch.Tensor:
        """Logits ``(B, T, V)`` of the model's current weights (which must be ``levels``) on ``input_ids``."""
        inner = self.model.model
        n_layers = len(inner.layers)
        self.layers_full += n_layers
        key = (tuple(input_ids.shape), hash(input_ids.numpy().tobytes()))
        is_reference = levels == self.reference
        cacheable = self._fits(input_ids)
        if cacheable and is_reference and self._key != key:
            return self._run_and_cache(input_ids, key)
        start = self.first_changed_layer(levels) if (cacheable and self._key == key) else 0
        h = self._hidden[start].clone() if start > 0 else inner.embed_tokens(input_ids)
        pos = self._positions(input_ids)
        for layer in inner.layers[start:]:
            h = self._block(layer, h, pos)
        self.layers_run += n_layers - start
        return self.model.lm_head(inner.norm(h))

    def _fits(self, input_ids: torch.Tensor) -> bool:
        hidden = self.model.config.hidden_size
        layers = len(self.model.model.layers)
        return input_ids.numel() * hidden * 4 * (layers + 1) <= self.budget_bytes

    def _positions(self, input_ids: torch.Tensor):
        t = input_ids.shape[1]
        if self._pos is None or self._pos[0].shape[-2] != t:
            ids = torch.arange(t)[None]
            dtype = self.model.model.embed_tokens.weight.dtype
            self._pos = self.model.model.rotary_emb(torch.zeros(1, t, 1, dtype=dtype), ids)
        return self._pos

    @staticmethod
    def _block(layer: nn.Module, h: torch.Tensor, pos) -> torch.Tensor:
        out = layer(h, attention_mask=None, position_embeddings=pos)
        return out[0] if isinstance(out, tuple) else out

    def _run_and_cache(self, input_ids: torch.Tensor, key: tuple) -> torch.Tensor:
        inner = self.model.model
        pos = self._positions(input_ids)
        h = inner.embed_tokens(input_ids)
        hidden = [h]
        for layer in inner.layers:
            h = self._block(layer, h, pos)
            hidden.append(h)
        self._key, self._hidden = key, hidden
        self.layers_run += len(inner.layers)
        return self.model.lm_head(inner.norm(h))
