"""The supernet: for every sublayer, compact pruned copies at each level of its grid, built layer by layer with
the paper's expectation error accumulation (eq. 5), stored as safetensors with a checksummed ``index.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .artifacts import KINDS, Kind, copy_key
from .errors import CorruptArtefactError, MissingArtefactError
from .families import Geometry
from .grid import Sublayer
from .layerwise import Activations, LayerwiseModel, capture_inputs, embed_windows, run_block
from .local_prune import LocalProblem, prepare, prune_prepared
from .pruned import PrunedLayout, PrunedSublayer, scatter_columns

log = logging.getLogger(__name__)

Accumulation = Literal["expectation", "centre", "none"]
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class PruneSettings:
    """Local pruner settings (ALGORITHM.md §2; defaults are the reference's)."""

    damping: float = 0.01
    attn_rounds: int = 1
    mlp_rounds: int = 16
    accumulation: Accumulation = "expectation"
    batch_size: int = 8
    activation_budget_bytes: int = 4 << 30
    spill_dir: Path | None = None


def output_linear(block: nn.Module, kind: Kind) -> nn.Linear:
    return block.self_attn.o_proj if kind == "attn" else block.mlp.down_proj


def layer_stats(
    block: nn.Module, inputs: Activations, pos: tuple[torch.Tensor, torch.Tensor], batch_size: int
) -> dict[Kind, torch.Tensor]:
    """fp32 ``H = sum x x^T`` of the inputs of ``o_proj`` and ``down_proj`` from one pass over the block."""
    linears = {kind: output_linear(block, kind) for kind in KINDS}
    hessians = {kind: torch.zeros(lin.in_features, lin.in_features) for kind, lin in linears.items()}

    def accumulate(kind: str, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        hessians[kind].addmm_(flat.t(), flat)

    with capture_inputs(linears, accumulate):
        run_block(block, inputs, None, pos, batch_size)
    return hessians


def prune_copy(
    problem: LocalProblem, sub: Sublayer, level: int, geo: Geometry, settings: PruneSettings
) -> PrunedSublayer:
    """One supernet copy: sublayer ``sub`` with ``sub.removed(level)`` groups removed."""
    rounds = settings.attn_rounds if sub.kind == "attn" else settings.mlp_rounds
    keep = sub.groups - sub.removed(level)
    return prune_prepared(problem, geo.group_size(sub.kind), keep, rounds)


def expected_weight(
    sub: Sublayer, copies: dict[int, PrunedSublayer], dense: torch.Tensor, geo: Geometry, mode: Accumulation
) -> torch.Tensor:
    """The weight the next layers see (ALGORITHM.md §4.3).

    ``expectation``: the density-weighted mean of the copies, ``sum_e (1 - S_e) W_e / sum_e (1 - S_e)``; since the
    output projection is linear this equals the density-weighted expectation of the copies' outputs (eq. 5).
    ``centre``: the level-0 copy. ``none``: the dense weight (the reference's de-facto behaviour).
    """
    if mode == "none":
        return dense
    gs = geo.group_size(sub.kind)
    if mode == "centre":
        return scatter_columns(copies[0], dense.shape[1], gs).to(dense.dtype)
    weights = {level: sub.density_weight(level) for level in copies}
    total = sum(weights.values())
    out = torch.zeros(dense.shape, dtype=torch.float32)
    if total == 0:
        return out.to(dense.dtype)
    for level, copy in copies.items():
        out += (weights[level] / total) * scatter_columns(copy, dense.shape[1], gs).float()
    return out.to(dense.dtype)


def copy_bytes(copy: PrunedSublayer) -> bytes:
    """Serialise one copy as safetensors bytes: ``weight`` (kept columns only) and ``kept`` (group indices)."""
    from safetensors.torch import save

    return save({"weight": copy.weight.contiguous(), "kept": copy.kept.to(torch.int64).contiguous()})


def save_copy(path: Path, copy: PrunedSublayer) -> str:
    """Write a copy to ``path`` atomically; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"weight": copy.weight.contiguous(), "kept": copy.kept.to(torch.int64).contiguous()}, str(tmp))
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


def build_layer(build: SupernetBuild, layer: int, inputs: Activations, outputs: Activations, pos) -> list[dict]:
    """Prune one decoder layer at every level, then advance its calibration activations to ``outputs``."""
    geo, settings = build.model.geometry, build.settings
    block = build.model.block(layer)
    hessians = layer_stats(block, inputs, pos, settings.batch_size)
    entries = []
    for kind in KINDS:
        sub = next(s for s in build.sublayers if s.layer == layer and s.kind == kind)
        lin = output_linear(block, kind)
        dense = lin.weight.detach().clone()
        problem = prepare(dense, hessians[kind], settings.damping)
        copies = {level: prune_copy(problem, sub, level, geo, settings) for level in sub.levels}
        for level, copy in copies.items():
            key = copy_key(build.iteration, layer, kind, level)
            digest = save_copy(build.out_dir / key, copy)
            size = (build.out_dir / key).stat().st_size
            entries.append(index_entry(sub, level, copy, geo, key, digest, size))
        with torch.no_grad():
            lin.weight.copy_(expected_weight(sub, copies, dense, geo, settings.accumulation))
    run_block(block, inputs, outputs, pos, settings.batch_size)
    return entries


def build_supernet(build: SupernetBuild, progress: Progress | None = None) -> dict:
    """Build every layer's copies in order, feeding each layer the accumulated expectation of its predecessors.

    Returns the index (also written to ``out_dir/index.json``).
    """
    model, settings = build.model, build.settings
    n, t = build.windows.shape
    shape = (n, t, model.geometry.hidden)
    acts = [Activations(shape, model.dtype, settings.activation_budget_bytes, settings.spill_dir) for _ in range(2)]
    embed_windows(model, build.windows, acts[0], settings.batch_size)
    pos = model.position_embeddings(t)
    entries: list[dict] = []
    for layer in range(model.num_layers):
        entries += build_layer(build, layer, acts[layer % 2], acts[(layer + 1) % 2], pos)
        if progress:
            progress("supernet", layer + 1, model.num_layers)
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
    """Lazy, verified access to a supernet on local disk through its ``index.json``.

    The index, not the file system, defines which copies exist.
    """

    def __init__(self, root: Path, index: dict | None = None, verify: bool = True):
        self.root = Path(root)
        if index is None:
            path = self.root / "index.json"
            if not path.is_file():
                raise MissingArtefactError(f"supernet index {path} is missing: the supernet build did not finish")
            index = json.loads(path.read_text())
        self.index = index
        self.verify = verify
        self.sublayers = [
            Sublayer(**{k: s[k] for k in ("layer", "kind", "groups", "centre", "step", "lo", "hi")})
            for s in index["sublayers"]
        ]
        self._entries = {(e["layer"], e["kind"], e["level"]): e for e in index["copies"]}

    def entry(self, layer: int, kind: Kind, level: int) -> dict:
        try:
            return self._entries[(layer, kind, level)]
        except KeyError:
            raise MissingArtefactError(f"supernet has no copy for layer {layer} {kind} level {level}") from None

    def load(self, layer: int, kind: Kind, level: int) -> PrunedSublayer:
        entry = self.entry(layer, kind, level)
        path = self.root / entry["key"]
        if not path.is_file():
            raise MissingArtefactError(f"supernet copy {path} listed in index.json is missing")
        if self.verify and sha256_file(path) != entry["sha256"]:
            raise CorruptArtefactError(
                f"supernet copy {path} is corrupt: sha256 differs from index.json; delete it and rebuild that layer"
            )
        return load_copy(path)

    def layout(self, levels: list[int]) -> PrunedLayout:
        return {(s.layer, s.kind): self.load(s.layer, s.kind, lv) for s, lv in zip(self.sublayers, levels, strict=True)}


class SupernetModel:
    """One resident HF model whose output projections are swapped to supernet copies; applying a candidate
    only reloads the sublayers whose level changed (ALGORITHM.md §5).
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
