"""The worker's workspace: a layer's replay uses the copies this process committed, held in memory, and they are the
committed bytes; a worker that did not prune them (a resumed build) reads the same values from the store."""

from __future__ import annotations

import gc
import weakref

import torch
from safetensors.torch import save_file

from flows.recipes import resolve_config
from tyr_core import keys
from tyr_core.grid import Sublayer
from tyr_core.store import commit_bytes, commit_file
from tyr_core.sublayer_layout import PrunedSublayer
from tyr_core.supernet import copy_bytes
from tyr_runtime.storage import run_store
from tyr_runtime.workspace import RunRef, Workspace


def _workspace(tmp_path) -> Workspace:
    ref = RunRef(run_id="w1", store_url=f"file://{tmp_path / 'store'}")
    store = run_store(ref.store_url, ref.run_id)
    return Workspace(ref, store, resolve_config("tiny-test"), tmp_path / "cache")


def test_replay_uses_held_copies_once_and_they_equal_the_committed_ones(tmp_path):
    ws = _workspace(tmp_path)
    sub = Sublayer(layer=0, kind="mlp", groups=8, centre=4, step=1, lo=-1, hi=1)
    made = {}
    for level in sub.levels:
        kept = torch.arange(8 - sub.removed(level), dtype=torch.int32)  # not the serialised dtype (int64)
        copy = PrunedSublayer(kept=kept, weight=torch.randn(kept.numel(), 4).t())  # not contiguous
        key = keys.copy_key(1, 0, "mlp", level)
        commit_bytes(ws.store, key, copy_bytes(copy), "cfg")
        ws.keep_committed_copy(key, copy)
        made[level] = copy

    held = ws.copies(1, [sub], 0)["mlp"]
    from_store = ws.copies(1, [sub], 0)["mlp"]  # the held ones were used up: what a fresh worker reads
    for level, copy in made.items():
        for got in (held[level], from_store[level]):
            assert got.kept.dtype == torch.int64 and torch.equal(got.kept, copy.kept.long())
            assert torch.equal(got.weight, copy.weight)
        assert held[level].weight.stride() == from_store[level].weight.stride()


def test_dropped_or_new_iteration_copies_are_not_held(tmp_path):
    ws = _workspace(tmp_path)
    sub = Sublayer(layer=0, kind="attn", groups=4, centre=2, step=1, lo=0, hi=0)
    key = keys.copy_key(1, 0, "attn", 0)
    copy = PrunedSublayer(kept=torch.tensor([0, 1]), weight=torch.ones(2, 2))
    commit_bytes(ws.store, key, copy_bytes(copy), "cfg")
    ws.keep_committed_copy(key, copy)
    ws.end_build()
    assert not ws._fresh
    assert torch.equal(ws.copies(1, [sub], 0)["attn"][0].weight, copy.weight)  # read from the store


def test_the_build_is_freed_once_the_supernet_is_committed(tmp_path):
    """``end_build`` (the supernet-index task) frees the cursor: the calibration activations and the last layer's
    Hessians are gigabytes on a large model, and the search that follows does not need them."""
    ws = _workspace(tmp_path)
    path = tmp_path / "w.safetensors"
    save_file({"windows": torch.randint(0, 100, (2, 8))}, str(path))
    commit_file(ws.store, keys.calibration_key(), path, "cfg")
    cursor = weakref.ref(ws.cursor(1, []))
    assert cursor() is not None and ws.cursor(1, []) is cursor()  # one cursor per build, kept between tasks
    ws.end_build()
    gc.collect()
    assert cursor() is None
