"""The supernet: for every sublayer, compact pruned copies at each level of its grid, built layer by layer with
the paper's expectation error accumulation (eq. 5), stored as safetensors with a checksummed ``index.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import CorruptArtefactError, MissingArtefactError
from .families import Geometry
from .grid import Sublayer
from .keys import KINDS, Kind, copy_key
from .layerwise import Activations, LayerwiseModel, capture_inputs, embed_windows, run_block
from .local_prune import LocalProblem, prepare, prune_prepared
from .sublayer_layout import PrunedLayout, PrunedSublayer, scatter_columns

log = logging.getLogger(__name__)

Accumulation = Literal["expectation", "centre", "none"]
RefitTarget = Literal["pruned", "dense"]
Progress = Callable[[str, int, int], None]  # (stage, done, total)


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


def output_linear(block: nn.Module, kind: Kind) -> nn.Linear:
    return block.self_attn.o_proj if kind == "attn" else block.mlp.down_proj


def _zeros_square(lin: nn.Linear) -> torch.Tensor:
    """An fp32 ``(d_in, d_in)`` accumulator on the layer's device."""
    return torch.zeros(lin.in_features, lin.in_features, device=lin.weight.device)


def layer_stats(
    block: nn.Module, inputs: Activations, pos: tuple[torch.Tensor, torch.Tensor], batch_size: int
) -> dict[Kind, torch.Tensor]:
    """fp32 ``H = sum x x^T`` of the inputs of ``o_proj`` and ``down_proj`` from one pass over the block."""
    linears = {kind: output_linear(block, kind) for kind in KINDS}
    hessians = {kind: _zeros_square(lin) for kind, lin in linears.items()}

    def accumulate(kind: str, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        hessians[kind].addmm_(flat.t(), flat)

    with capture_inputs(linears, accumulate):
        run_block(block, inputs, None, pos, batch_size)
    return hessians


def paired_stats(
    block: nn.Module, inputs: Activations, dense_inputs: Activations, pos, batch_size: int
) -> tuple[dict[Kind, torch.Tensor], dict[Kind, torch.Tensor]]:
    """``H = sum x x^T`` of the pruned stream and ``C = sum x x_dense^T`` against the dense stream, per output
    projection, from one pass of the (dense-weight) block over each stream."""
    linears = {kind: output_linear(block, kind) for kind in KINDS}
    hessians = {kind: _zeros_square(lin) for kind, lin in linears.items()}
    cross = {kind: torch.zeros_like(h) for kind, h in hessians.items()}
    seen: dict[str, torch.Tensor] = {}

    def grab(kind: str, x: torch.Tensor) -> None:
        seen[kind] = x.reshape(-1, x.shape[-1]).float()

    with capture_inputs(linears, grab), torch.inference_mode():
        for (_, x), (_, xd) in zip(inputs.batches(batch_size), dense_inputs.batches(batch_size), strict=True):
            device = pos[0].device
            block(xd.to(device), attention_mask=None, position_embeddings=pos)
            dense = dict(seen)
            block(x.to(device), attention_mask=None, position_embeddings=pos)
            for kind in KINDS:
                hessians[kind].addmm_(seen[kind].t(), seen[kind])
                cross[kind].addmm_(seen[kind].t(), dense[kind])
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


def stored_tensors(copy: PrunedSublayer) -> dict[str, torch.Tensor]:
    """A copy's tensors as they are serialised (and as ``load_copy`` returns them): ``weight`` (kept columns only)
    and ``kept`` (int64 group indices), contiguous, on the CPU."""
    return {"weight": copy.weight.to("cpu").contiguous(), "kept": copy.kept.to("cpu", torch.int64).contiguous()}


def copy_bytes(copy: PrunedSublayer) -> bytes:
    """Serialise one copy as safetensors bytes (``stored_tensors``)."""
    from safetensors.torch import save

    return save(stored_tensors(copy))


def save_copy(path: Path, copy: PrunedSublayer) -> str:
    """Write a copy to ``path`` atomically; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(stored_tensors(copy), str(tmp))
    digest = sha256_file(tmp)
    tmp.replace(path)
    return digest


def load_copy(path: Path) -> PrunedSublayer:
    with safe_open(str(path), "pt") as f:
        return PrunedSublayer(kept=f.get_tensor("kept"), weight=f.get_tensor("weight"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def index_entry(sub: Sublayer, level: int, copy: PrunedSublayer, geo: Geometry, key: str, digest: str, size: int):
    return {
        "name": sub.name,
        "layer": sub.layer,
        "kind": sub.kind,
        "level": level,
        "groups_total": sub.groups,
        "groups_removed": sub.removed(level),
        "groups_kept": int(copy.kept.numel()),
        "sparsity": sub.sparsity(level),
        "params": geo.sublayer_params(sub.kind, copy.kept),
        "params_dense": geo.dense_sublayer_params(sub.kind),
        "key": key,
        "sha256": digest,
        "bytes": size,
    }


class LayerCursor:
    """Calibration activations of one supernet build, advanced one decoder layer at a time in this process.

    Layer ``l``'s inputs are the outputs of layers ``0..l-1`` carrying their expected weights, a pure function
    of the committed copies; so a fresh process (a resumed run) catches up by replaying those layers.
    Hessians and the prepared local problems of the current layer are kept for the local-prune steps.
    """

    def __init__(
        self,
        model: LayerwiseModel,
        windows: torch.Tensor,
        settings: PruneSettings,
        sublayers: list[Sublayer] | None = None,
    ):
        if settings.mlp_after_attention and sublayers is None:
            raise ValueError("mlp_after_attention needs the build's sublayers to form the attention's expected weight")
        self.model, self.settings, self.sublayers = model, settings, sublayers
        n, t = windows.shape
        shape = (n, t, model.geometry.hidden)
        budget, spill = settings.activation_budget_bytes, settings.spill_dir
        # the two buffers (this layer's inputs, the next layer's) share the device budget
        on_device = dict(device=model.device, device_budget=settings.device_budget_bytes // 2)
        self._acts = [Activations(shape, model.dtype, budget, spill, **on_device) for _ in range(2)]
        embed_windows(model, windows, self._acts[0], settings.batch_size)
        # the dense model's own activations, for fitting dense outputs from pruned inputs
        self._dense: list[Activations] | None = None
        if settings.refit_target == "dense" and settings.accumulation != "none":
            self._dense = [Activations(shape, model.dtype, budget, spill, **on_device) for _ in range(2)]
            self._dense[0].data.copy_(self._acts[0].data)
        self._cross: dict[Kind, torch.Tensor] | None = None
        self.pos = model.position_embeddings(t)
        self.layer = 0
        self._block: nn.Module | None = None
        self._hessians: dict[Kind, torch.Tensor] | None = None
        self._problems: dict[Kind, LocalProblem] = {}
        self._lock = threading.RLock()

    @property
    def inputs(self) -> Activations:
        return self._acts[self.layer % 2]

    def _current_block(self) -> nn.Module:
        if self._block is None:
            self._block = self.model.block(self.layer)
        return self._block

    def hessians(self) -> dict[Kind, torch.Tensor]:
        """``H`` of ``o_proj`` and ``down_proj`` of the current layer (one pass over its inputs, computed once)."""
        with self._lock:
            if self._hessians is None:
                block, bs = self._current_block(), self.settings.batch_size
                if self._dense is None:
                    self._hessians = layer_stats(block, self.inputs, self.pos, bs)
                else:
                    dense_inputs = self._dense[self.layer % 2]
                    self._hessians, self._cross = paired_stats(block, self.inputs, dense_inputs, self.pos, bs)
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
        copies = {level: prune_copy(problem, attn, level, self.model.geometry, self.settings) for level in attn.levels}
        lin = output_linear(self._current_block(), "attn")
        dense = lin.weight.detach().clone()
        expected = expected_weight(attn, copies, dense, self.model.geometry, self.settings.accumulation)
        try:
            with torch.no_grad():
                lin.weight.copy_(expected)
            return layer_stats(self._current_block(), self.inputs, self.pos, self.settings.batch_size)["mlp"]
        finally:
            with torch.no_grad():
                lin.weight.copy_(dense)

    def problem(self, kind: Kind) -> LocalProblem:
        """The prepared local problem (damped H, G, H^-1) of the current layer's sublayer, shared by its levels."""
        with self._lock:
            if kind not in self._problems:
                dense = output_linear(self._current_block(), kind).weight.detach().clone()
                hessian = self.hessians()[kind]
                cross = self._cross[kind] if self._cross is not None else None
                self._problems[kind] = prepare(dense, hessian, self.settings.damping, cross)
            return self._problems[kind]

    def prune(self, sub: Sublayer, level: int) -> PrunedSublayer:
        if sub.layer != self.layer:
            raise RuntimeError(f"cursor is at layer {self.layer}, cannot prune layer {sub.layer}")
        return prune_copy(self.problem(sub.kind), sub, level, self.model.geometry, self.settings)

    def advance(self, sublayers: list[Sublayer], copies: dict[Kind, dict[int, PrunedSublayer]]) -> None:
        """Give the current layer its expected weights, run it, and move to the next layer."""
        block, geo = self._current_block(), self.model.geometry
        if self._dense is not None:  # the dense stream first, while the block still has its dense weights
            nxt = self._dense[(self.layer + 1) % 2]
            run_block(block, self._dense[self.layer % 2], nxt, self.pos, self.settings.batch_size)
        for sub in (s for s in sublayers if s.layer == self.layer):
            lin = output_linear(block, sub.kind)
            new = expected_weight(sub, copies[sub.kind], lin.weight.detach(), geo, self.settings.accumulation)
            with torch.no_grad():
                lin.weight.copy_(new)
        run_block(block, self.inputs, self._acts[(self.layer + 1) % 2], self.pos, self.settings.batch_size)
        self.layer += 1
        self._block, self._hessians, self._cross, self._problems = None, None, None, {}

    def seek(self, layer: int, sublayers: list[Sublayer], load: Callable[[int], dict[Kind, dict[int, PrunedSublayer]]]):
        """Replay layers up to ``layer`` with their committed copies (``load(layer)``), e.g. after a restart."""
        if layer < self.layer:
            raise RuntimeError(f"cursor is already past layer {layer} (at {self.layer}); start a new cursor")
        while self.layer < layer:
            self.advance(sublayers, load(self.layer))


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
        copies: dict[Kind, dict[int, PrunedSublayer]] = {}
        for sub in (s for s in build.sublayers if s.layer == layer):
            copies[sub.kind] = {level: cursor.prune(sub, level) for level in sub.levels}
            entries += [save_layer_copy(build, sub, level, c) for level, c in copies[sub.kind].items()]
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


class SupernetReader:
    """Lazy, verified access to a supernet through its ``index.json``; the index, not the file system, defines
    which copies exist. ``fetch(key)`` gives a local path for a key (default: ``root / key``); each file is
    checked against the index's sha256 once per reader.
    """

    def __init__(
        self,
        root: Path,
        index: dict | None = None,
        verify: bool = True,
        fetch: Callable[[str], Path] | None = None,
    ):
        self.root = Path(root)
        if index is None:
            path = self.root / "index.json"
            if not path.is_file():
                raise MissingArtefactError(f"supernet index {path} is missing: the supernet build did not finish")
            index = json.loads(path.read_text())
        self.index = index
        self.verify = verify
        self.fetch = fetch or (lambda key: self.root / key)
        fields = ("layer", "kind", "groups", "centre", "step", "lo", "hi")
        self.sublayers = [Sublayer(**{k: s[k] for k in fields}) for s in index["sublayers"]]
        self._entries = {(e["layer"], e["kind"], e["level"]): e for e in index["copies"]}
        self._verified: set[Path] = set()

    def entry(self, layer: int, kind: Kind, level: int) -> dict:
        try:
            return self._entries[(layer, kind, level)]
        except KeyError:
            raise MissingArtefactError(f"supernet has no copy for layer {layer} {kind} level {level}") from None

    def load(self, layer: int, kind: Kind, level: int) -> PrunedSublayer:
        entry = self.entry(layer, kind, level)
        path = self.fetch(entry["key"])
        if not path.is_file():
            raise MissingArtefactError(f"supernet copy {path} listed in index.json is missing")
        if self.verify and path not in self._verified:
            if sha256_file(path) != entry["sha256"]:
                raise CorruptArtefactError(
                    f"supernet copy {path} is corrupt: its sha256 differs from index.json; delete it and rebuild"
                )
            self._verified.add(path)
        return load_copy(path)

    def layout(self, levels: list[int]) -> PrunedLayout:
        return {(s.layer, s.kind): self.load(s.layer, s.kind, lv) for s, lv in zip(self.sublayers, levels, strict=True)}


class SupernetModel:
    """One resident HF model whose output projections are swapped to supernet copies; applying a candidate
    only reloads the sublayers whose level changed (docs/algorithm.md).
    """

    def __init__(self, model: nn.Module, reader: SupernetReader, geo: Geometry):
        self.model = model
        self.reader = reader
        self.geo = geo
        self.levels: list[int | None] = [None] * len(reader.sublayers)

    def apply(self, levels: list[int]) -> int:
        """Swap in the copies for ``levels``; returns how many sublayers were reloaded."""
        changed = 0
        for i, (sub, level) in enumerate(zip(self.reader.sublayers, levels, strict=True)):
            if self.levels[i] == level:
                continue
            copy = self.reader.load(sub.layer, sub.kind, level)
            lin = output_linear(self.model.model.layers[sub.layer], sub.kind)
            with torch.no_grad():
                lin.weight.copy_(scatter_columns(copy, lin.in_features, self.geo.group_size(sub.kind)))
            self.levels[i] = level
            changed += 1
        return changed
