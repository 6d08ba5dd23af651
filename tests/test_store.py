"""File store and commit protocol: atomic commits, verification, idempotence, GC confined to its prefix."""

from __future__ import annotations

import errno

import pytest

from tyr_core import artifacts as keys
from tyr_core.errors import ArtefactError, CorruptArtefactError, MissingArtefactError, StoreError
from tyr_core.store import FileStore, collect_garbage, commit_bytes, fetch_verified, is_committed, read_verified


def test_commit_then_verified_read_and_idempotent_recommit(tmp_path):
    store = FileStore(tmp_path / "s")
    m = commit_bytes(store, "a/b.bin", b"hello", "cfg")
    assert is_committed(store, "a/b.bin") and read_verified(store, "a/b.bin") == b"hello"
    assert commit_bytes(store, "a/b.bin", b"hello", "cfg").sha256 == m.sha256
    with pytest.raises(ArtefactError, match="already committed with other bytes"):
        commit_bytes(store, "a/b.bin", b"other", "cfg")


def test_corruption_and_missing_objects_are_named(tmp_path):
    store = FileStore(tmp_path)
    commit_bytes(store, "x.bin", b"payload", "cfg")
    (tmp_path / "x.bin").write_bytes(b"paylord")
    with pytest.raises(CorruptArtefactError, match="'x.bin'.*corrupt"):
        read_verified(store, "x.bin")
    with pytest.raises(CorruptArtefactError):
        fetch_verified(store, "x.bin", tmp_path / "dl" / "x.bin")
    assert not (tmp_path / "dl" / "x.bin").exists()
    with pytest.raises(MissingArtefactError, match="'y.bin' is not committed"):
        read_verified(store, "y.bin")


def test_put_if_absent_is_a_conditional_create(tmp_path):
    store = FileStore(tmp_path)
    assert store.put_if_absent("k", b"1") and not store.put_if_absent("k", b"2")
    assert store.get_bytes("k") == b"1"


@pytest.mark.parametrize("key", ["", "/abs", "../up", "a/../../b", "a\\b", "a//b"])
def test_keys_cannot_escape_the_store(tmp_path, key):
    with pytest.raises(StoreError, match="invalid artefact key"):
        FileStore(tmp_path).put_bytes(key, b"x")


def test_full_disk_leaves_the_committed_object_intact(tmp_path, monkeypatch):
    store = FileStore(tmp_path)
    commit_bytes(store, "copy.bin", b"committed", "cfg")
    import os

    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreError, match="disk is full"):
        store.put_bytes("copy.bin", b"new bytes")
    monkeypatch.setattr(os, "fsync", real)
    assert read_verified(store, "copy.bin") == b"committed"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_gc_keeps_the_last_iteration_and_never_leaves_the_prefix(tmp_path):
    outside = FileStore(tmp_path)
    commit_bytes(outside, "other-run/iter-1/supernet/x.safetensors", b"keep me", "cfg")
    store = FileStore(tmp_path / "runs" / "r")
    for it in (1, 2):
        commit_bytes(store, keys.copy_key(it, 0, "attn", 0), b"c" * 100, "cfg")
        commit_bytes(store, keys.stats_key(it, 0), b"h" * 50, "cfg")
        commit_bytes(store, keys.search_state_key(it, 1), b"{}", "cfg")
    assert collect_garbage(store, 2).bytes_freed == 0  # result of iteration 2 not committed yet
    commit_bytes(store, keys.result_key(2), b"{}", "cfg")
    report = collect_garbage(store, 2)
    assert report.bytes_freed == 150 and report.keys_deleted == 2
    assert not is_committed(store, keys.copy_key(1, 0, "attn", 0))
    assert is_committed(store, keys.copy_key(2, 0, "attn", 0)) and is_committed(store, keys.search_state_key(1, 1))
    assert collect_garbage(store, 2).keys_deleted == 0  # resumable / idempotent
    assert read_verified(outside, "other-run/iter-1/supernet/x.safetensors") == b"keep me"
