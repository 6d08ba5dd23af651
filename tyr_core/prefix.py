"""Candidate forwards that share the layers a candidate has in common with the search parent.

Offspring differ from their parent in 2-8 sublayers (1-4 sparsity shifts). Every layer before a candidate's
first changed layer computes exactly what the parent computes, so those hidden states are cached per minibatch
(filled by whichever candidate runs through them first) and later candidates start at their first changed layer.
Results are identical to a full forward; the saving is measured in ``bench/quality.py``.

With ``capture`` set, each forward also keeps the outputs of those decoder layers (``captured``), for the fitness's
hidden-state term (``search.hidden_weight``); a layer inside the shared prefix is read from the reference's cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .grid import Sublayer
from .streaming import BlockStreamer


class PrefixForward:
    """Logits of a resident HF causal LM whose current weights are a candidate's, reusing the reference
    candidate's (the parent's) hidden states for the unchanged prefix of layers.

    Args:
        model: the resident model (its output projections are swapped by ``SupernetModel.apply``).
        sublayers: the genes, giving each level's layer.
        budget_bytes: most bytes of cached hidden states (oldest minibatches dropped beyond it); 0 disables sharing.
        streamer: runs the decoder blocks with their weights streamed through the device (models that do not fit).
        capture: decoder layers whose outputs each forward keeps in ``captured`` as ``(B, len(capture), T, d)``.
    """

    def __init__(
        self,
        model: nn.Module,
        sublayers: list[Sublayer],
        budget_bytes: int = 2 << 30,
        streamer: BlockStreamer | None = None,
        capture: Sequence[int] = (),
    ):
        self.model = model
        self.streamer = streamer
        self.layer_of = [s.layer for s in sublayers]
        self.budget_bytes = budget_bytes
        self.reference: list[int] | None = None
        self._cache: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        self._pos: tuple[torch.Tensor, torch.Tensor] | None = None
        self.layers_run = 0
        self.layers_full = 0
        self.capture = tuple(capture)
        self.captured: torch.Tensor | None = None

    def set_reference(self, levels: list[int]) -> None:
        """The candidate whose prefix states are shared (the search parent); clears the cache if it changed."""
        if levels != self.reference:
            self.reference = list(levels)
            self._cache.clear()

    def first_changed_layer(self, levels: list[int]) -> int:
        if self.reference is None:
            return 0
        changed = [self.layer_of[i] for i, (a, b) in enumerate(zip(levels, self.reference, strict=True)) if a != b]
        return min(changed, default=len(self.model.model.layers))

    def logits(self, input_ids: torch.Tensor, levels: list[int]) -> torch.Tensor:
        """Logits ``(B, T, V)`` of the model's current weights (which must be ``levels``) on ``input_ids``."""
        inner = self.model.model
        n_layers = len(inner.layers)
        sharing = self.budget_bytes > 0
        shared = self.first_changed_layer(levels) if sharing else 0  # boundaries 0..shared: reference states
        states = self._states(input_ids) if sharing else []
        start = min(shared, len(states) - 1) if states else 0
        h = states[start] if states else inner.embed_tokens(input_ids.to(inner.embed_tokens.weight.device))
        if not states:
            states.append(h)
        pos = self._positions(input_ids)
        kept = {j: states[j + 1] for j in self.capture if j + 1 <= start}  # outputs inside the shared prefix
        for j in range(start, n_layers):
            h = self.streamer.run(j, h, pos) if self.streamer is not None else self._block(inner.layers[j], h, pos)
            if j < shared and j + 1 == len(states):
                states.append(h)  # still the reference's computation: share it
            if j in self.capture:
                kept[j] = h
        self.captured = torch.stack([kept[j] for j in self.capture], dim=1) if self.capture else None
        self.layers_run += n_layers - start
        self.layers_full += n_layers
        self._trim()
        return self.model.lm_head(inner.norm(h))

    def _states(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        key = (tuple(input_ids.shape), hash(input_ids.cpu().numpy().tobytes()))
        if key not in self._cache:
            self._cache[key] = []
        self._cache.move_to_end(key)
        return self._cache[key]

    def _trim(self) -> None:
        def size() -> int:
            return sum(t.numel() * t.element_size() for states in self._cache.values() for t in states)

        while len(self._cache) > 1 and size() > self.budget_bytes:
            self._cache.popitem(last=False)

    def _positions(self, input_ids: torch.Tensor):
        t = input_ids.shape[1]
        if self._pos is None or self._pos[0].shape[-2] != t:
            dtype = self.model.model.embed_tokens.weight.dtype
            device = self.model.model.embed_tokens.weight.device
            zeros = torch.zeros(1, t, 1, dtype=dtype, device=device)
            self._pos = self.model.model.rotary_emb(zeros, torch.arange(t, device=device)[None])
        return self._pos

    @staticmethod
    def _block(layer: nn.Module, h: torch.Tensor, pos: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        out = layer(h, attention_mask=None, position_embeddings=pos)
        return out[0] if isinstance(out, tuple) else out
