"""Decoder blocks streamed through the device, for models whose weights do not fit on it.

The model's parameters stay in host memory (pinned on a GPU host); a block's tensors are copied to the device just
before it computes, the next block's copy starts on a side stream while the current one computes, and the device
copies are dropped after. At most two blocks are resident. Weight writes between forwards (a candidate swapping
its copies in) land in the host tensors, which stay the only authoritative copy. On the CPU nothing moves.
"""

from __future__ import annotations

import torch
from torch import nn


class BlockStreamer:
    """Runs ``model.model.layers[j]`` on ``device`` with its weights streamed in from host memory.

    Embeddings, the final norm and the LM head are moved to the device once (they are needed by every forward).
    ``always_copy`` streams even on the CPU (copies to the same device), so the mechanism can be tested there.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, always_copy: bool = False):
        self.model, self.device = model, torch.device(device)
        self.moves = self.device.type != "cpu" or always_copy  # always_copy: exercise the streaming on a CPU
        inner = model.model
        for part in (inner.embed_tokens, inner.norm, model.lm_head, inner.rotary_emb):
            part.to(self.device)
        self.layers = list(inner.layers)
        self._host: list[dict[str, torch.Tensor]] = []
        for layer in self.layers:
            tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
            host = {}
            for name, t in tensors.items():
                data = t.data.to("cpu")
                if self.moves and torch.cuda.is_available():
                    data = data.pin_memory()
                t.data = data
                host[name] = data
            self._host.append(host)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._staged: dict[int, dict[str, torch.Tensor]] = {}
        self.blocks_moved = 0

    def _stage(self, j: int) -> None:
        """Start copying block ``j``'s tensors to the device (on the side stream)."""
        if not self.moves or j >= len(self.layers) or j in self._staged:
            return
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                self._staged[j] = {n: t.to(self.device, non_blocking=True, copy=True) for n, t in self._host[j].items()}
        else:
            self._staged[j] = {n: t.to(self.device, copy=True) for n, t in self._host[j].items()}
        self.blocks_moved += 1

    def _bind(self, j: int, tensors: dict[str, torch.Tensor]) -> None:
        layer = self.layers[j]
        for name, t in (dict(layer.named_parameters()) | dict(layer.named_buffers())).items():
            t.data = tensors[name]

    def run(self, j: int, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Block ``j`` on ``hidden`` (already on the device), prefetching block ``j + 1`` meanwhile."""
        layer = self.layers[j]
        if self.moves:
            self._stage(j)
            staged = self._staged.pop(j)
            if self._stream is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(self._stream)
                for t in staged.values():  # allocated on the side stream, used on this one
                    t.record_stream(current)
            self._bind(j, staged)
            self._stage(j + 1)
        try:
            out = layer(hidden, attention_mask=None, position_embeddings=position_embeddings)
        finally:
            if self.moves:
                self._bind(j, self._host[j])  # the device copy is freed once its kernels are done
        return out[0] if isinstance(out, tuple) else out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
