"""The supernet as stored: for every sublayer, compact pruned copies at each level of its grid, as safetensors with a
checksummed ``index.json``; reading it back (verified) and applying a candidate's copies to a model. Building it is
``supernet_build``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import CorruptArtefactError, MissingArtefactError
from .families import Geometry
from .grid import Sublayer
from .keys import Kind
from .sublayer_layout import PrunedLayout, PrunedSublayer, scatter_columns
from .tensor_files import corrupt_tensors, load_tensors


def output_linear(block: nn.Module, kind: Kind) -> nn.Linear:
    return block.self_attn.o_proj if kind == "attn" else block.mlp.down_proj


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


def load_copy(path: Path, groups: int | None = None, num_kept: int | None = None, what: str = "") -> PrunedSublayer:
    """A stored copy, checked before anything applies it: ``kept`` is 1-D int64, strictly increasing, inside
    ``[0, groups)`` and ``num_kept`` long (each check where its bound is given), and ``weight`` is 2-D with a whole
    number of columns per kept group. ``what`` names the copy in errors (its key; default its path).

    Raises:
        CorruptArtefactError: malformed safetensors bytes, or a copy that does not fit its sublayer.
    """
    what = what or "supernet copy"
    found = load_tensors(path, what, ("kept", "weight"))
    kept, weight = found["kept"], found["weight"]

    def bad(problem: str) -> CorruptArtefactError:
        return corrupt_tensors(what, path, problem)

    if kept.dtype != torch.int64 or kept.dim() != 1 or weight.dim() != 2:
        raise bad(
            f"kept is {kept.dtype} of shape {list(kept.shape)} and weight of shape {list(weight.shape)}, not "
            "1-D int64 indices and a 2-D matrix"
        )
    if kept.numel() and (int(kept.min()) < 0 or bool((kept.diff() <= 0).any())):
        raise bad("its kept group indices are negative, repeated or out of order")
    if groups is not None and kept.numel() and int(kept.max()) >= groups:
        raise bad(f"it keeps group {int(kept.max())} of a sublayer with {groups} groups")
    if num_kept is not None and kept.numel() != num_kept:
        raise bad(f"it keeps {kept.numel()} groups where its level keeps {num_kept}")
    if weight.shape[1] % max(kept.numel(), 1) or (not kept.numel() and weight.shape[1]):
        raise bad(f"its weight has {weight.shape[1]} columns for {kept.numel()} kept groups")
    return PrunedSublayer(kept=kept, weight=weight)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def index_entry(
    sub: Sublayer, level: int, copy: PrunedSublayer, geo: Geometry, key: str, digest: str, size: int
) -> dict:
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
        return load_copy(path, entry.get("groups_total"), entry.get("groups_kept"), f"supernet copy {entry['key']!r}")

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
