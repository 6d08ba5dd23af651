"""Building the supernet layer by layer with the paper's expectation error accumulation (eq. 5): each layer's
statistics, its copies at every level of its grid, and the expected weights its successors are calibrated on.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .families import Geometry
from .grid import Sublayer
from .keys import KINDS, Kind, copy_key
from .layerwise import (
    Activations,
    LayerwiseModel,
    ShardedActivations,
    capture_inputs,
    embed_windows,
    in_chunk_order,
    on_each_device,
)
from .local_prune import LocalProblem, prepare, prune_prepared
from .sublayer_layout import PrunedSublayer, scatter_columns
from .supernet import index_entry, output_linear, save_copy

Accumulation = Literal["expectation", "centre", "none"]
RefitTarget = Literal["pruned", "dense"]
Progress = Callable[[str, int, int], None]  # (stage, done, total)

Positions = tuple[torch.Tensor, torch.Tensor]  # the rotary (cos, sin) of the windows' positions


@dataclass(frozen=True)
class PruneSettings:
    """Local pruner settings (docs/algorithm.md; defaults are the reference's)."""

    damping: float = 0.01
    attn_rounds: int = 1
    mlp_rounds: int = 16
    accumulation: Accumulation = "expectation"
    refit_target: RefitTarget = "pruned"  # "dense": fit the dense model's outputs (see prepare())
    first_order: float = 1.0  # weight of the saliency's first-order term (local_prune._scores)
    mlp_after_attention: bool = False  # the MLP's H sees the same layer's expected attention weight
    batch_size: int = 8
    activation_budget_bytes: int = 4 << 30  # host memory; beyond it activations spill to ``spill_dir``
    spill_dir: Path | None = None
    device_budget_bytes: int = 0  # activations that fit live on the compute device (a GPU) instead of the host
    devices: tuple[torch.device, ...] = ()  # a build's devices (empty: the model's); the bits do not depend on them


def chunk_stats(
    blocks: list[nn.Module],
    inputs: ShardedActivations,
    pos: list[Positions],
    dense_inputs: ShardedActivations | None = None,
) -> tuple[dict[Kind, torch.Tensor], dict[Kind, torch.Tensor] | None]:
    """fp32 ``H = sum x x^T`` of the inputs of ``o_proj`` and ``down_proj`` (and, given the dense stream,
    ``C = sum x x_dense^T``), as one partial per chunk of windows, each on the device holding its chunk
    (``blocks[k]`` and ``pos[k]`` are device ``k``'s), summed in chunk order on the first device.

    Chunks and the order of the sum do not depend on the number of devices, so neither do the bits of H and C.
    """
    home = inputs.devices[0]

    def partials(k: int):
        block, device = blocks[k], inputs.devices[k]
        linears = {kind: output_linear(block, kind) for kind in KINDS}
        seen: dict[str, torch.Tensor] = {}

        def grab(kind: str, x: torch.Tensor) -> None:
            seen[kind] = x.reshape(-1, x.shape[-1]).float()

        for c in inputs.owned[k]:
            # hooks and inference mode per chunk: neither may leak into the caller while this generator waits
            with capture_inputs(linears, grab), torch.inference_mode():
                dense = None
                if dense_inputs is not None:  # the dense stream through the same (dense-weight) block
                    xd = dense_inputs.local(c).to(device, non_blocking=True)
                    block(xd, attention_mask=None, position_embeddings=pos[k])
                    dense = dict(seen)
                x = inputs.local(c).to(device, non_blocking=True)
                block(x, attention_mask=None, position_embeddings=pos[k])
                h = {kind: seen[kind].t() @ seen[kind] for kind in KINDS}
                cross = None if dense is None else {kind: seen[kind].t() @ dense[kind] for kind in KINDS}
            yield c, (h, cross)

    hessians: dict[Kind, torch.Tensor] = {}
    crosses: dict[Kind, torch.Tensor] | None = None if dense_inputs is None else {}
    for _, (h, cross) in in_chunk_order(inputs, partials):
        for kind in KINDS:
            _add(hessians, kind, h[kind].to(home))
            if crosses is not None:
                _add(crosses, kind, cross[kind].to(home))
    return hessians, crosses


def _add(total: dict[Kind, torch.Tensor], kind: Kind, part: torch.Tensor) -> None:
    if kind in total:
        total[kind] += part
    else:
        total[kind] = part.clone()  # the first partial is the sum so far: no rounding from adding it to zeros


def layer_stats(block: nn.Module, inputs: Activations, pos: Positions, batch_size: int) -> dict[Kind, torch.Tensor]:
    """fp32 ``H = sum x x^T`` of the inputs of ``o_proj`` and ``down_proj`` from one pass over the block, summed
    over chunks of ``batch_size`` windows in order (``chunk_stats`` on one device)."""
    device = pos[0].device
    return chunk_stats([block], ShardedActivations.of(inputs, batch_size, device), [pos])[0]


def paired_stats(
    block: nn.Module, inputs: Activations, dense_inputs: Activations, pos: Positions, batch_size: int
) -> tuple[dict[Kind, torch.Tensor], dict[Kind, torch.Tensor]]:
    """``H = sum x x^T`` of the pruned stream and ``C = sum x x_dense^T`` against the dense stream, per output
    projection, from one pass of the (dense-weight) block over each stream (``chunk_stats`` on one device)."""
    device = pos[0].device
    sharded = ShardedActivations.of(inputs, batch_size, device)
    dense = ShardedActivations.of(dense_inputs, batch_size, device)
    hessians, cross = chunk_stats([block], sharded, [pos], dense)
    return hessians, cross


def prune_copy(
    problem: LocalProblem, sub: Sublayer, level: int, geo: Geometry, settings: PruneSettings
) -> PrunedSublayer:
    """One supernet copy: sublayer ``sub`` with ``sub.removed(level)`` groups removed."""
    rounds = settings.attn_rounds if sub.kind == "attn" else settings.mlp_rounds
    keep = sub.groups - sub.removed(level)
    return prune_prepared(problem, geo.group_size(sub.kind), keep, rounds, first_order=settings.first_order)


def expected_weight(
    sub: Sublayer, copies: dict[int, PrunedSublayer], dense: torch.Tensor, geo: Geometry, mode: Accumulation
) -> torch.Tensor:
    """The weight the next layers see (docs/algorithm.md).

    ``expectation``: the density-weighted mean of the copies, ``sum_e (1 - S_e) W_e / sum_e (1 - S_e)``; since the
    output projection is linear this equals the density-weighted expectation of the copies' outputs (eq. 5).
    ``centre``: the level-0 copy. ``none``: the dense weight (the reference's de-facto behaviour).
    """
    if mode == "none":
        return dense
    gs = geo.group_size(sub.kind)
    if mode == "centre":
        return scatter_columns(copies[0], dense.shape[1], gs).to(dense.device, dense.dtype)
    weights = {level: sub.density_weight(level) for level in copies}
    total = sum(weights.values())
    out = torch.zeros(dense.shape, dtype=torch.float32, device=dense.device)
    if total == 0:
        return out.to(dense.dtype)
    for level, copy in copies.items():
        out += (weights[level] / total) * scatter_columns(copy, dense.shape[1], gs).to(dense.device).float()
    return out.to(dense.dtype)


class LayerCursor:
    """Calibration activations of one supernet build, advanced one decoder layer at a time in this process.

    Layer ``l``'s inputs are the outputs of layers ``0..l-1`` carrying their expected weights, a pure function
    of the committed copies; so a fresh process (a resumed run) catches up by replaying those layers.
    Hessians and the prepared local problems of the current layer are kept for the local-prune steps.

    With several ``devices`` (default: ``settings.devices``, else the model's device) the windows are dealt out to
    them a chunk of ``batch_size`` at a time, each device holds a copy of the current block, the Hessians are summed
    from per-chunk partials in chunk order on the first device, and ``prune_all`` spreads a layer's prunes over
    the devices: the copies and activations have the same bits for any number of devices of one kind.
    """

    def __init__(
        self,
        model: LayerwiseModel,
        windows: torch.Tensor,
        settings: PruneSettings,
        sublayers: list[Sublayer] | None = None,
        devices: Sequence[torch.device | str] | None = None,
    ):
        if settings.mlp_after_attention and sublayers is None:
            raise ValueError("mlp_after_attention needs the build's sublayers to form the attention's expected weight")
        self.model, self.settings, self.sublayers = model, settings, sublayers
        devices = devices or settings.devices or [model.device]
        self.devices = [torch.device(d) for d in devices]
        n, t = windows.shape
        shape = (n, t, model.geometry.hidden)

        def buffer() -> ShardedActivations:
            # the two buffers (this layer's inputs, the next layer's) share each device's budget
            return ShardedActivations(
                shape,
                model.dtype,
                settings.batch_size,
                self.devices,
                settings.activation_budget_bytes,
                settings.spill_dir,
                settings.device_budget_bytes // 2,
            )

        self._acts = [buffer(), buffer()]
        embed_windows(model, windows, self._acts[0], settings.batch_size)
        # the dense model's own activations, for fitting dense outputs from pruned inputs
        self._dense: list[ShardedActivations] | None = None
        if settings.refit_target == "dense" and settings.accumulation != "none":
            self._dense = [buffer(), buffer()]
            self._dense[0].copy_from(self._acts[0])
        self._cross: dict[Kind, torch.Tensor] | None = None
        pos = model.position_embeddings(t)
        self.pos = [tuple(p.to(d) for p in pos) for d in self.devices]  # copies: the same values on every device
        self.layer = 0
        self._blocks: list[nn.Module] | None = None
        self._hessians: dict[Kind, torch.Tensor] | None = None
        self._problems: dict[Kind, LocalProblem] = {}
        self._moved: dict[tuple[Kind, int], LocalProblem] = {}
        self._pruned: dict[tuple[Kind, int], PrunedSublayer] = {}
        self.prune_log: list[tuple[Kind, int, int, str]] = []  # (kind, level, device index, thread name) of every prune
        self._lock = threading.RLock()
        self._log_lock = threading.Lock()

    @property
    def inputs(self) -> ShardedActivations:
        return self._acts[self.layer % 2]

    def _current_blocks(self) -> list[nn.Module]:
        """The current block on every device: read once, then copied (the same weights on each)."""
        if self._blocks is None:
            first = self.model.block(self.layer, self.devices[0])
            self._blocks = [first] + [deepcopy(first).to(d) for d in self.devices[1:]]
        return self._blocks

    def _current_block(self) -> nn.Module:
        return self._current_blocks()[0]

    def _set_weight(self, kind: Kind, weight: torch.Tensor) -> None:
        """Give every device's copy of the block one output projection's weight."""
        with torch.no_grad():
            for block in self._current_blocks():
                output_linear(block, kind).weight.copy_(weight)

    def _stats(self, dense: bool) -> tuple[dict[Kind, torch.Tensor], dict[Kind, torch.Tensor] | None]:
        dense_inputs = self._dense[self.layer % 2] if dense and self._dense is not None else None
        return chunk_stats(self._current_blocks(), self.inputs, self.pos, dense_inputs)

    def hessians(self) -> dict[Kind, torch.Tensor]:
        """``H`` of ``o_proj`` and ``down_proj`` of the current layer (one pass over its inputs, computed once)."""
        with self._lock:
            if self._hessians is None:
                self._hessians, self._cross = self._stats(dense=True)
                if self.settings.mlp_after_attention and self.settings.accumulation != "none":
                    self._hessians["mlp"] = self._mlp_hessian_after_attention()
            return self._hessians

    def _mlp_hessian_after_attention(self) -> torch.Tensor:
        """``H`` of ``down_proj`` with the layer's attention at its expected weight, as the next layer will see it."""
        attn = next((s for s in self.sublayers if s.layer == self.layer and s.kind == "attn"), None)
        if attn is None:
            return self._hessians["mlp"]
        problem = prepare(
            output_linear(self._current_block(), "attn").weight.detach().clone(),
            self._hessians["attn"],
            self.settings.damping,
            self._cross["attn"] if self._cross is not None else None,
        )
        self._problems["attn"] = problem
        pruned = self.prune_all([(attn, level) for level in attn.levels])
        copies = dict(zip(attn.levels, pruned, strict=True))
        dense = output_linear(self._current_block(), "attn").weight.detach().clone()
        expected = expected_weight(attn, copies, dense, self.model.geometry, self.settings.accumulation)
        try:
            self._set_weight("attn", expected)
            return self._stats(dense=False)[0]["mlp"]
        finally:
            self._set_weight("attn", dense)

    def problem(self, kind: Kind) -> LocalProblem:
        """The prepared local problem (damped H, G, H^-1) of the current layer's sublayer, shared by its levels."""
        with self._lock:
            if kind not in self._problems:
                dense = output_linear(self._current_block(), kind).weight.detach().clone()
                hessian = self.hessians()[kind]
                cross = self._cross[kind] if self._cross is not None else None
                self._problems[kind] = prepare(dense, hessian, self.settings.damping, cross)
            return self._problems[kind]

    def _problem_on(self, kind: Kind, k: int) -> LocalProblem:
        """The problem's tensors copied to device ``k`` (the same values: each prune computes the same bits there)."""
        moved = self._moved.get((kind, k))
        if moved is not None:  # without the lock: ``prune_all``'s threads read what their caller prepared
            return moved
        with self._lock:
            if (kind, k) not in self._moved:
                problem = self.problem(kind)
                moved = {f.name: getattr(problem, f.name).to(self.devices[k]) for f in fields(problem)}
                self._moved[(kind, k)] = problem if k == 0 else LocalProblem(**moved)
            return self._moved[(kind, k)]

    def prune(self, sub: Sublayer, level: int) -> PrunedSublayer:
        if sub.layer != self.layer:
            raise RuntimeError(f"cursor is at layer {self.layer}, cannot prune layer {sub.layer}")
        with self._lock:
            held = self._pruned.get((sub.kind, level))
        if held is not None:  # computed by ``prune_all``
            return held
        return self._prune_on(sub, level, 0)

    def _prune_on(self, sub: Sublayer, level: int, k: int) -> PrunedSublayer:
        pruned = prune_copy(self._problem_on(sub.kind, k), sub, level, self.model.geometry, self.settings)
        with self._log_lock:  # not the cursor's lock: the caller of ``prune_all`` may hold that one
            self.prune_log.append((sub.kind, level, k, threading.current_thread().name))
        return pruned

    def prune_all(self, requests: list[tuple[Sublayer, int]]) -> list[PrunedSublayer]:
        """The copies of ``requests`` (sublayer, level) of the current layer, spread over the devices (request ``i`` on
        device ``i mod len(devices)``, one thread per device); they are also kept for ``prune`` until ``advance``."""
        for sub, _ in requests:
            if sub.layer != self.layer:
                raise RuntimeError(f"cursor is at layer {self.layer}, cannot prune layer {sub.layer}")
        g = min(len(self.devices), len(requests)) or 1
        for i, (sub, _) in enumerate(requests):
            self._problem_on(sub.kind, i % g)  # here, so that the threads only read what they need
        out: list[PrunedSublayer | None] = [None] * len(requests)

        def work(k: int) -> None:
            for i in range(k, len(requests), g):
                out[i] = self._prune_on(*requests[i], k)

        on_each_device(g, work)
        with self._lock:
            for (sub, level), pruned in zip(requests, out, strict=True):
                self._pruned[(sub.kind, level)] = pruned
        return out

    def advance(self, sublayers: list[Sublayer], copies: dict[Kind, dict[int, PrunedSublayer]]) -> None:
        """Give the current layer its expected weights, run it, and move to the next layer."""
        blocks, geo = self._current_blocks(), self.model.geometry
        nxt = (self.layer + 1) % 2
        if self._dense is not None:  # the dense stream first, while the blocks still have their dense weights
            _run_sharded(blocks, self._dense[self.layer % 2], self._dense[nxt], self.pos)
        for sub in (s for s in sublayers if s.layer == self.layer):
            dense = output_linear(blocks[0], sub.kind).weight.detach()
            self._set_weight(sub.kind, expected_weight(sub, copies[sub.kind], dense, geo, self.settings.accumulation))
        _run_sharded(blocks, self.inputs, self._acts[nxt], self.pos)
        self.layer += 1
        self._blocks, self._hessians, self._cross = None, None, None
        self._problems, self._moved, self._pruned = {}, {}, {}

    def seek(
        self, layer: int, sublayers: list[Sublayer], load: Callable[[int], dict[Kind, dict[int, PrunedSublayer]]]
    ) -> None:
        """Replay layers up to ``layer`` with their committed copies (``load(layer)``), e.g. after a restart."""
        if layer < self.layer:
            raise RuntimeError(f"cursor is already past layer {layer} (at {self.layer}); start a new cursor")
        while self.layer < layer:
            self.advance(sublayers, load(self.layer))


def _run_sharded(
    blocks: list[nn.Module], inputs: ShardedActivations, outputs: ShardedActivations, pos: list[Positions]
) -> None:
    """Every device runs its copy of the block over its own chunks, writing its own part of ``outputs``."""

    def work(k: int) -> None:
        device = inputs.devices[k]
        with torch.inference_mode():
            for c in inputs.owned[k]:
                x = inputs.local(c).to(device, non_blocking=True)
                y = blocks[k](x, attention_mask=None, position_embeddings=pos[k])
                outputs.local(c)[:] = y[0] if isinstance(y, tuple) else y

    on_each_device(len(blocks), work)


@dataclass
class SupernetBuild:
    """Inputs of a supernet build; ``out_dir`` receives the copies (at their artefact keys) and ``index.json``."""

    model: LayerwiseModel
    windows: torch.Tensor  # (N, T) calibration token ids
    sublayers: list[Sublayer]
    settings: PruneSettings
    out_dir: Path
    iteration: int = 1
    config_hash: str = ""


def save_layer_copy(build: SupernetBuild, sub: Sublayer, level: int, copy: PrunedSublayer) -> dict:
    """Write one copy under ``out_dir`` at its artefact key; returns its index entry."""
    key = copy_key(build.iteration, sub.layer, sub.kind, level)
    digest = save_copy(build.out_dir / key, copy)
    size = (build.out_dir / key).stat().st_size
    return index_entry(sub, level, copy, build.model.geometry, key, digest, size)


def build_supernet(build: SupernetBuild, progress: Progress | None = None) -> dict:
    """Build every layer's copies in order, feeding each layer the accumulated expectation of its predecessors.

    Returns the index (also written to ``out_dir/index.json``).
    """
    cursor = LayerCursor(build.model, build.windows, build.settings, build.sublayers)
    entries: list[dict] = []
    for layer in range(build.model.num_layers):
        requests = [(sub, level) for sub in build.sublayers if sub.layer == layer for level in sub.levels]
        copies: dict[Kind, dict[int, PrunedSublayer]] = {}
        for (sub, level), pruned in zip(requests, cursor.prune_all(requests), strict=True):
            copies.setdefault(sub.kind, {})[level] = pruned
            entries.append(save_layer_copy(build, sub, level, pruned))
        cursor.advance(build.sublayers, copies)
        if progress:
            progress("supernet", layer + 1, build.model.num_layers)
    index = make_index(build, entries)
    (build.out_dir / "index.json").write_text(json.dumps(index, indent=1))
    return index


def make_index(build: SupernetBuild, entries: list[dict]) -> dict:
    return {
        "iteration": build.iteration,
        "config_hash": build.config_hash,
        "accumulation": build.settings.accumulation,
        "sublayers": [
            {
                "name": s.name,
                "layer": s.layer,
                "kind": s.kind,
                "groups": s.groups,
                "centre": s.centre,
                "step": s.step,
                "lo": s.lo,
                "hi": s.hi,
            }
            for s in build.sublayers
        ],
        "copies": entries,
    }
