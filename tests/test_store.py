"""File store, commit protocol and GC: atomic writes, conditional creates, verified reads, idempotent and
conflicting commits, full disks, key confinement, and a garbage collector that is ordered and resumable."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from tyr_core import keys
from tyr_core.errors import (
    ArtefactError,
    ConfigError,
    CorruptArtefactError,
    InvalidKeyError,
    MissingArtefactError,
    StoreError,
)
from tyr_core.store import (
    FileStore,
    Store,
    best_iteration,
    collect_garbage,
    commit_bytes,
    commit_file,
    commit_json,
    commit_json_once,
    commit_once,
    fetch_verified,
    is_committed,
    read_json,
    read_manifest,
    read_verified,
    remaining,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


class RecordingStore:
    """A FileStore that records writes and deletes, and can crash after a number of deletes."""

    def __init__(self, inner: FileStore, crash_after_deletes: int | None = None):
        self.inner, self.ops, self.crash_after = inner, [], crash_after_deletes

    @property
    def url(self) -> str:
        return self.inner.url

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put_bytes(self, key, data):
        self.ops.append(("put", key))
        self.inner.put_bytes(key, data)

    def put_file(self, key, path):
        self.ops.append(("put", key))
        self.inner.put_file(key, path)

    def put_if_absent(self, key, data):
        self.ops.append(("create", key))
        return self.inner.put_if_absent(key, data)

    def delete(self, key):
        if self.crash_after is not None and sum(op == "delete" for op, _ in self.ops) >= self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        self.ops.append(("delete", key))
        self.inner.delete(key)


# ------------------------------------------------------------------------------------------- FileStore basics


def test_file_store_satisfies_the_protocol_and_has_a_file_url(tmp_path):
    store = FileStore(tmp_path / "s")
    assert isinstance(store, Store)
    assert store.url == (tmp_path / "s").resolve().as_uri() and store.url.startswith("file:///")


def test_put_get_exists_size_delete(tmp_path):
    store = FileStore(tmp_path)
    store.put_bytes("a/b/c.bin", b"12345")
    assert store.get_bytes("a/b/c.bin") == b"12345" and store.exists("a/b/c.bin") and store.size("a/b/c.bin") == 5
    assert not store.exists("a/b") and not store.exists("nope")
    store.put_bytes("a/b/c.bin", b"replaced")
    assert store.get_bytes("a/b/c.bin") == b"replaced"
    store.delete("a/b/c.bin")
    store.delete("a/b/c.bin")  # idempotent
    assert not (tmp_path / "a").exists() and tmp_path.is_dir()  # empty folders tidied, never the root
    with pytest.raises(MissingArtefactError, match="'a/b/c.bin' is not in"):
        store.get_bytes("a/b/c.bin")
    with pytest.raises(MissingArtefactError):
        store.size("a/b/c.bin")
    with pytest.raises(MissingArtefactError):
        store.get_file("a/b/c.bin", tmp_path / "out")


def test_put_file_and_get_file_stream_large_files(tmp_path):
    store = FileStore(tmp_path / "s")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(9 << 20))  # more than one 4 MiB chunk
    store.put_file("x/big.bin", src)
    store.get_file("x/big.bin", tmp_path / "dl" / "big.bin")
    assert (tmp_path / "dl" / "big.bin").read_bytes() == src.read_bytes()
    assert not temp_files(tmp_path)
    with pytest.raises(StoreError, match="does not exist"):
        store.put_file("x/other.bin", tmp_path / "missing.bin")


def test_list_uses_string_prefixes_like_s3(tmp_path):
    store = FileStore(tmp_path)
    for key in ("iter-1/a", "iter-1/sub/b", "iter-10/c", "iter-2/d", "run.json"):
        store.put_bytes(key, b"x")
    (tmp_path / "iter-1" / ".tmp-half-written").write_bytes(b"partial")
    assert store.list("iter-1/") == ["iter-1/a", "iter-1/sub/b"]
    assert store.list("iter-1") == ["iter-1/a", "iter-1/sub/b", "iter-10/c"]
    assert store.list("iter-1/s") == ["iter-1/sub/b"]
    assert store.list("") == ["iter-1/a", "iter-1/sub/b", "iter-10/c", "iter-2/d", "run.json"]
    assert store.list("nothing/") == [] and store.list("run.json") == ["run.json"]


@pytest.mark.parametrize("key", ["", "/abs", "../up", "a/../../b", "a\\b", "a//b", "a/./b", "a/", "a\x00b", ".tmp-x"])
def test_keys_cannot_escape_the_store(tmp_path, key):
    store = FileStore(tmp_path / "s")
    for op in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.put_if_absent(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: commit_bytes(store, key, b"x", "cfg"),
    ):
        with pytest.raises(InvalidKeyError, match="invalid artefact key"):
            op()
    assert not (tmp_path / "up").exists() and not (tmp_path / "b").exists()


def test_list_prefixes_cannot_escape_the_store(tmp_path):
    (tmp_path / "secret").write_bytes(b"outside")
    store = FileStore(tmp_path / "s")
    for prefix in ("../", "..", "/", "a//"):
        with pytest.raises(InvalidKeyError):
            store.list(prefix)


def test_put_if_absent_is_a_conditional_create(tmp_path):
    store = FileStore(tmp_path)
    assert store.put_if_absent("k", b"1") and not store.put_if_absent("k", b"2")
    assert store.get_bytes("k") == b"1" and not temp_files(tmp_path)


def test_put_if_absent_has_exactly_one_winner_under_contention(tmp_path):
    store = FileStore(tmp_path)
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        results.append(store.put_if_absent("lock.json", f"{i}".encode()))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert store.get_bytes("lock.json") in {f"{i}".encode() for i in range(8)}


def _fail_fsync_with(monkeypatch, code: int) -> None:
    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)


@pytest.mark.parametrize("write", ["put_bytes", "put_if_absent", "put_file"])
def test_full_disk_leaves_the_committed_object_intact(tmp_path, monkeypatch, write):
    store = FileStore(tmp_path / "s")
    commit_bytes(store, "copy.bin", b"committed", "cfg")
    src = tmp_path / "new.bin"
    src.write_bytes(b"new bytes")
    with monkeypatch.context() as m:
        _fail_fsync_with(m, errno.ENOSPC)
        with pytest.raises(StoreError, match=r"'copy.bin'.*disk is full: free space"):
            if write == "put_file":
                store.put_file("copy.bin", src)
            else:
                getattr(store, write)("copy.bin", b"new bytes")
    assert read_verified(store, "copy.bin") == b"committed"
    assert not temp_files(tmp_path / "s")


def test_a_failed_rename_reports_the_key_and_cleans_up(tmp_path, monkeypatch):
    store = FileStore(tmp_path)
    store.put_bytes("k.bin", b"old")

    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(StoreError, match=r"'k.bin'.*not writable"):
        store.put_bytes("k.bin", b"new")
    monkeypatch.undo()
    assert store.get_bytes("k.bin") == b"old" and not temp_files(tmp_path)


def test_an_uncreatable_root_is_a_store_error(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match="cannot create the store folder"):
        FileStore(tmp_path / "file" / "store")


# ------------------------------------------------------------------------------------------- commit protocol


def test_commit_writes_the_object_then_its_manifest(tmp_path):
    store = RecordingStore(FileStore(tmp_path))
    m = commit_bytes(store, "a/b.bin", b"hello", "cfg-1", meta={"layer": 3})
    stored = keys.object_key("a/b.bin", sha(b"hello"))  # named by its content
    assert store.ops == [("put", stored), ("create", keys.manifest_key("a/b.bin"))]
    body = json.loads((tmp_path / keys.manifest_key("a/b.bin")).read_bytes())
    assert body["object"] == stored and (tmp_path / stored).read_bytes() == b"hello"
    assert body["sha256"] == sha(b"hello") and body["size"] == 5 and body["config_hash"] == "cfg-1"
    assert body["meta"] == {"layer": 3} and body["created"] > 0 and body["key"] == "a/b.bin"
    assert read_manifest(store, "a/b.bin") == m and is_committed(store, "a/b.bin")
    assert read_verified(store, "a/b.bin") == b"hello"
    with pytest.raises(Exception):  # noqa: B017 - frozen model: any mutation error will do
        m.sha256 = "0" * 64


def test_recommitting_the_same_bytes_is_a_no_op(tmp_path):
    store = RecordingStore(FileStore(tmp_path))
    first = commit_bytes(store, "a.bin", b"same", "cfg")
    store.ops.clear()
    again = commit_bytes(store, "a.bin", b"same", "cfg", meta={"ignored": True})
    assert again == first and store.ops == []  # nothing rewritten, the original manifest returned


def test_committing_other_bytes_is_refused_and_keeps_the_original(tmp_path):
    store = FileStore(tmp_path)
    commit_bytes(store, "a.bin", b"original", "cfg")
    with pytest.raises(ArtefactError, match=r"'a.bin'.*already committed with other bytes") as info:
        commit_bytes(store, "a.bin", b"different", "cfg")
    assert sha(b"original") in str(info.value) and sha(b"different") in str(info.value)
    assert read_verified(store, "a.bin") == b"original"


def test_losing_the_manifest_race_with_the_same_bytes_is_fine_and_with_other_bytes_is_an_error(tmp_path):
    """Two writers pass the 'not committed yet' check together; the conditional create picks one."""
    store = FileStore(tmp_path)
    winner = commit_bytes(store, "x.bin", b"A", "c")

    class Late(RecordingStore):  # sees no manifest, then loses the create
        def get_bytes(self, key):
            if key == keys.manifest_key("x.bin") and not self.ops:
                raise MissingArtefactError(key)
            return self.inner.get_bytes(key)

    assert commit_bytes(Late(store), "x.bin", b"A", "c") == winner
    with pytest.raises(ArtefactError, match="already committed with other bytes.*the committed artefact is untouched"):
        commit_bytes(Late(store), "x.bin", b"B", "c")
    assert read_verified(store, "x.bin") == b"A"  # the committed object was never overwritten
    assert store.list("") == sorted([keys.object_key("x.bin", sha(b"A")), keys.manifest_key("x.bin")])  # nor left


def test_commit_file_and_fetch_verified_round_trip(tmp_path):
    store = FileStore(tmp_path / "s")
    src = tmp_path / "copy.safetensors"
    src.write_bytes(os.urandom(5 << 20))
    m = commit_file(store, "iter-1/supernet/layer-0/mlp/level+0.safetensors", src, "cfg")
    assert m.size == 5 << 20 and m.sha256 == sha(src.read_bytes())
    assert commit_file(store, m.key, src, "cfg") == m  # idempotent
    out = fetch_verified(store, m.key, tmp_path / "cache" / "copy.safetensors")
    assert out.read_bytes() == src.read_bytes() and not temp_files(tmp_path)


def test_json_helpers_commit_canonical_json(tmp_path):
    store = FileStore(tmp_path)
    commit_json(store, "plan.json", {"b": 1, "a": [1, 2]}, "cfg")
    assert read_json(store, "plan.json") == {"a": [1, 2], "b": 1}
    first = read_manifest(store, "plan.json")
    again = commit_json(store, "plan.json", {"a": [1, 2], "b": 1}, "cfg")  # same object, other key order: same bytes
    assert again == first and read_json(store, "plan.json") == {"a": [1, 2], "b": 1}


def test_commit_once_computes_what_is_not_committed_and_reads_back_what_is(tmp_path):
    store, calls = FileStore(tmp_path), []

    def produce() -> dict:
        calls.append(1)
        return {"b": 1, "a": 2.5}

    assert remaining(store, "r.json", "final/compact/") == ["r.json", "final/compact/"]
    assert commit_json_once(store, "r.json", produce, "cfg") == {"a": 2.5, "b": 1} and len(calls) == 1
    assert commit_json_once(store, "r.json", produce, "cfg") == {"a": 2.5, "b": 1} and len(calls) == 1
    assert read_verified(store, "r.json") == b'{\n "a": 2.5,\n "b": 1\n}'  # commit_json's bytes
    commit_json(store, keys.export_marker_key("compact"), {"files": []}, "cfg")  # an export is its file list
    assert remaining(store, "r.json", "final/compact/", "x.bin") == ["x.bin"]
    assert commit_once(store, "x.bin", lambda: b"payload", "cfg") == b"payload"
    assert commit_once(store, "x.bin", lambda: b"other", "cfg") == b"payload"  # committed: never produced again


def test_corruption_is_detected_and_named(tmp_path):
    store = FileStore(tmp_path)
    commit_bytes(store, "x.bin", b"payload", "cfg")
    (tmp_path / keys.object_key("x.bin", sha(b"payload"))).write_bytes(b"paylord")
    with pytest.raises(CorruptArtefactError, match="'x.bin'.*corrupt") as info:
        read_verified(store, "x.bin")
    assert sha(b"payload") in str(info.value) and sha(b"paylord") in str(info.value)
    with pytest.raises(CorruptArtefactError):
        read_json(store, "x.bin")


def test_fetch_verified_deletes_a_bad_download_and_keeps_a_good_local_copy(tmp_path):
    store = FileStore(tmp_path / "s")
    commit_bytes(store, "x.bin", b"payload", "cfg")
    dest = tmp_path / "dl" / "x.bin"
    fetch_verified(store, "x.bin", dest)
    (tmp_path / "s" / keys.object_key("x.bin", sha(b"payload"))).write_bytes(b"tampered")
    with pytest.raises(CorruptArtefactError, match="'x.bin'"):
        fetch_verified(store, "x.bin", dest)
    assert dest.read_bytes() == b"payload"  # the verified copy was never replaced by bad bytes
    with pytest.raises(CorruptArtefactError):
        fetch_verified(store, "x.bin", tmp_path / "dl" / "fresh.bin")
    assert not (tmp_path / "dl" / "fresh.bin").exists() and not temp_files(tmp_path)


def test_missing_artefacts_are_named(tmp_path):
    store = FileStore(tmp_path)
    with pytest.raises(MissingArtefactError, match="'y.bin' is not committed"):
        read_verified(store, "y.bin")
    with pytest.raises(MissingArtefactError, match="'y.bin' is not committed"):
        fetch_verified(store, "y.bin", tmp_path / "y.bin")
    commit_bytes(store, "z.bin", b"z", "cfg")
    (tmp_path / keys.object_key("z.bin", sha(b"z"))).unlink()
    with pytest.raises(MissingArtefactError, match="'z.bin' has a manifest but no object"):
        read_verified(store, "z.bin")
    with pytest.raises(MissingArtefactError, match="'z.bin' has a manifest but no object"):
        fetch_verified(store, "z.bin", tmp_path / "dl" / "z.bin")
    assert not is_committed(store, "y.bin") and is_committed(store, "z.bin")


def test_unreadable_or_misplaced_manifests_are_corrupt(tmp_path):
    store = FileStore(tmp_path)
    store.put_bytes("a.bin", b"a")
    store.put_bytes(keys.manifest_key("a.bin"), b"{not json")
    with pytest.raises(CorruptArtefactError, match="manifest 'a.bin.manifest.json'.*unreadable"):
        read_verified(store, "a.bin")
    commit_bytes(store, "b.bin", b"b", "cfg")
    store.put_bytes(keys.manifest_key("a.bin"), store.get_bytes(keys.manifest_key("b.bin")))
    with pytest.raises(CorruptArtefactError, match="commits 'b.bin', not 'a.bin'"):
        read_verified(store, "a.bin")


# ------------------------------------------------------------------------------------------ garbage collection


def _fill_iterations(store, iterations=(1, 2, 3)) -> None:
    for it in iterations:
        for layer in (0, 1):
            commit_bytes(store, keys.copy_key(it, layer, "attn", 0), b"c" * 100, "cfg")
            commit_bytes(store, keys.stats_key(it, layer), b"h" * 50, "cfg")
        commit_bytes(store, keys.supernet_index_key(it), b"{}", "cfg")
        commit_bytes(store, keys.plan_key(it), b"{}", "cfg")
        commit_bytes(store, keys.search_state_key(it, 1), b"{}", "cfg")


def _dangling_manifests(store) -> list[str]:
    listed = set(store.list(""))
    return [k for k in listed if keys.is_manifest(k) and _stored_at(store, k) not in listed]


def _stored_at(store, manifest: str) -> str:
    """The object a manifest names (content-addressed; the artefact's own key in runs committed before)."""
    return json.loads(store.get_bytes(manifest)).get("object") or keys.manifest_target(manifest)


def _with_objects(store, artefacts: list[str]) -> list[str]:
    """Every key that committing ``artefacts`` left in the store: their manifests and the objects they name."""
    return sorted(k for a in artefacts for k in (keys.manifest_key(a), read_manifest(store, a).stored_at))


def test_gc_waits_for_the_result_then_keeps_the_last_iteration_and_never_leaves_the_prefix(tmp_path):
    outside = FileStore(tmp_path)
    commit_bytes(outside, "runs/other/iter-1/supernet/x.safetensors", b"keep me", "cfg")
    commit_bytes(outside, "iter-1/stats/layer-0.safetensors", b"keep me too", "cfg")  # above the run prefix
    store = FileStore(tmp_path / "runs" / "r")
    _fill_iterations(store, (1, 2))
    assert collect_garbage(store, 2) == collect_garbage(store, 2, keep_last=0)  # nothing: no result yet
    assert is_committed(store, keys.copy_key(1, 0, "attn", 0))
    commit_bytes(store, keys.result_key(2), b"{}", "cfg")
    report = collect_garbage(store, 2)
    # iteration 1: 2 copies (100 B) + 2 stats (50 B) + index (2 B), each with a manifest
    assert report.bytes_freed == 302 and report.keys_deleted == 10 and report.iterations == (1,)
    assert store.list(keys.stats_prefix(1)) == [] and store.list(keys.supernet_prefix(1)) == []
    for kept in (keys.copy_key(2, 0, "attn", 0), keys.stats_key(2, 1), keys.search_state_key(1, 1), keys.plan_key(1)):
        assert read_verified(store, kept)
    assert collect_garbage(store, 2).keys_deleted == 0  # done: running again is a no-op
    assert read_verified(outside, "runs/other/iter-1/supernet/x.safetensors") == b"keep me"
    assert read_verified(outside, "iter-1/stats/layer-0.safetensors") == b"keep me too"


def test_gc_keep_last(tmp_path):
    store = FileStore(tmp_path)
    _fill_iterations(store, (1, 2, 3))
    commit_bytes(store, keys.result_key(3), b"{}", "cfg")
    assert collect_garbage(store, 3, keep_last=2).iterations == (1,)
    assert store.list(keys.supernet_prefix(2)) and not store.list(keys.supernet_prefix(1))
    assert collect_garbage(store, 3, keep_last=0).iterations == (1, 2, 3)
    assert store.list("iter-3/") == _with_objects(
        store, [keys.plan_key(3), keys.result_key(3), keys.search_state_key(3, 1)]
    )
    with pytest.raises(ConfigError, match="keep_last"):
        collect_garbage(store, 3, keep_last=-1)


def test_gc_deletes_each_manifest_before_its_object(tmp_path):
    store = RecordingStore(FileStore(tmp_path))
    _fill_iterations(store, (1, 2))
    commit_bytes(store, keys.result_key(2), b"{}", "cfg")
    manifest_of = {_stored_at(store, k): k for k in store.list("") if keys.is_manifest(k)}
    store.ops.clear()
    collect_garbage(store, 2)
    deleted = [k for op, k in store.ops if op == "delete"]
    assert len(deleted) == 10
    for key in deleted:
        if not keys.is_manifest(key):
            assert deleted.index(manifest_of[key]) < deleted.index(key)


@pytest.mark.parametrize("crash_after", [1, 2, 5, 9])
def test_gc_interrupted_anywhere_leaves_no_dangling_manifest_and_resumes(tmp_path, crash_after):
    inner = FileStore(tmp_path)
    _fill_iterations(inner, (1, 2))
    commit_bytes(inner, keys.result_key(2), b"{}", "cfg")
    with pytest.raises(KeyboardInterrupt):
        collect_garbage(RecordingStore(inner, crash_after_deletes=crash_after), 2)
    assert _dangling_manifests(inner) == []
    collect_garbage(inner, 2)
    assert inner.list("iter-1/stats/") == [] and inner.list("iter-1/supernet/") == []
    assert read_verified(inner, keys.copy_key(2, 1, "attn", 0)) == b"c" * 100


def test_gc_removes_manifests_orphaned_by_someone_else(tmp_path):
    store = FileStore(tmp_path)
    _fill_iterations(store, (1, 2))
    commit_bytes(store, keys.result_key(2), b"{}", "cfg")
    (tmp_path / read_manifest(store, keys.stats_key(1, 0)).stored_at).unlink()  # its manifest points at nothing
    collect_garbage(store, 2)
    assert store.list("iter-1/stats/") == [] and _dangling_manifests(store) == []


def test_the_best_iteration_by_validation_fitness_is_final_and_survives_gc(tmp_path):
    store = FileStore(tmp_path)
    _fill_iterations(store, (1, 2, 3))
    assert best_iteration(store, 3) == 3  # no results yet: the last
    for it, fitness in ((1, 0.50), (2, 0.40), (3, 0.45)):
        commit_json(store, keys.result_key(it), {"iteration": it, "validation_fitness": fitness}, "cfg")
    assert best_iteration(store, 1) == 1 and best_iteration(store, 3) == 2
    assert collect_garbage(store, 3, keep_last=1).iterations == (1,)  # iteration 2's supernet is kept
    assert store.list(keys.supernet_prefix(2)) and store.list(keys.supernet_prefix(3))
    commit_json(store, keys.result_key(4), {"iteration": 4, "validation_fitness": 0.40}, "cfg")
    assert best_iteration(store, 4) == 4  # a tie goes to the later iteration


# ------------------------------------------------------------------------------------------ symbolic links


def _run_with_a_linked_folder(tmp_path):
    """A run whose iteration-1 supernet folder is a symbolic link to a folder outside the store."""
    outside = tmp_path / "outside"
    (outside / "layer-0" / "attn").mkdir(parents=True)
    victim = outside / "layer-0" / "attn" / "level+0.safetensors"
    victim.write_bytes(b"not the store's")
    store = FileStore(tmp_path / "runs" / "r")
    _fill_iterations(store, (2,))
    commit_bytes(store, keys.result_key(2), b"{}", "cfg")
    (tmp_path / "runs" / "r" / "iter-1").mkdir()
    (tmp_path / "runs" / "r" / keys.supernet_prefix(1).rstrip("/")).symlink_to(outside)
    return store, victim


def test_gc_cannot_delete_outside_the_run_through_a_symbolic_link(tmp_path):
    store, victim = _run_with_a_linked_folder(tmp_path)
    with pytest.raises(StoreError, match="symbolic link"):
        collect_garbage(store, 2)
    assert victim.read_bytes() == b"not the store's"
    for op in (
        lambda: store.delete(keys.copy_key(1, 0, "attn", 0)),
        lambda: store.get_bytes(keys.copy_key(1, 0, "attn", 0)),
        lambda: store.put_bytes(keys.copy_key(1, 0, "attn", 0), b"x"),
        lambda: store.list(keys.supernet_prefix(1)),
        lambda: store.list(""),
    ):
        with pytest.raises(StoreError, match="symbolic link"):
            op()
    assert victim.read_bytes() == b"not the store's"


def test_a_linked_file_is_refused_too(tmp_path):
    store = FileStore(tmp_path / "s")
    (tmp_path / "elsewhere").write_bytes(b"x")
    (tmp_path / "s" / "k.bin").symlink_to(tmp_path / "elsewhere")
    for op in (lambda: store.delete("k.bin"), lambda: store.get_bytes("k.bin"), lambda: store.list("")):
        with pytest.raises(StoreError, match="symbolic link"):
            op()
    assert (tmp_path / "elsewhere").read_bytes() == b"x"


def test_objects_are_not_world_readable(tmp_path):
    store = FileStore(tmp_path)
    m = commit_bytes(store, "a/b.bin", b"x", "cfg")
    for key in (m.stored_at, keys.manifest_key("a/b.bin")):
        assert (tmp_path / key).stat().st_mode & 0o007 == 0
