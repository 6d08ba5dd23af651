"""A task's cache key: stable while its artefact is committed (Retry shows it Cached) and on its first run (its result
is stored under that key), fresh once a result is cached but the artefact is gone (deleted after it was found corrupt),
so the resume computes it again instead of answering from the result cache."""

from __future__ import annotations

from types import SimpleNamespace

from flows.recipes import resolve_config
from tasks.policies import artefact_cache_key
from tyr_core import keys
from tyr_core.store import commit_json, uncommit
from tyr_runtime.runs import open_run, release_run
from tyr_runtime.workspace import workspace


def test_a_deleted_artefact_gets_a_fresh_cache_key_and_a_committed_one_a_stable_key(tmp_path):
    ref = open_run(resolve_config("tiny-test"), "ck", f"file://{tmp_path}", None)
    release_run(ref)
    cache_key = artefact_cache_key(lambda p: keys.plan_key(p["iteration"]))
    params = {"ref": ref, "iteration": 1}
    stored: set[str] = set()
    context = SimpleNamespace(result_store=SimpleNamespace(exists=lambda key: key in stored))

    first = cache_key(context, params)  # never computed: its result will be stored under this key
    stored.add(first)
    commit_json(workspace(ref).store, keys.plan_key(1), {"plan": 1}, "cfg")
    assert cache_key(context, params) == first  # committed: Retry answers from the cache
    uncommit(workspace(ref).store, keys.plan_key(1))  # deleted (e.g. found corrupt)
    redo = cache_key(context, params)
    assert redo != first and "-redo-" in redo and cache_key(context, params) != redo  # computed again
    commit_json(workspace(ref).store, keys.plan_key(1), {"plan": 1}, "cfg")
    assert cache_key(context, params) == first


def test_a_layers_copies_are_one_short_cache_key_stable_once_all_are_committed(tmp_path):
    ref = open_run(resolve_config("tiny-test"), "ck", f"file://{tmp_path}", None)
    release_run(ref)
    copies = [keys.copy_key(1, 0, kind, level) for level in range(-4, 5) for kind in ("attn", "mlp")]  # '+' in 8
    cache_key = artefact_cache_key(lambda p: copies)
    params = {"ref": ref}
    stored: set[str] = set()
    context = SimpleNamespace(result_store=SimpleNamespace(exists=lambda key: key in stored))

    first = cache_key(context, params)
    assert len(first) <= 200  # a file name in the result storage
    stored.add(first)
    for key in copies[:-1]:
        commit_json(workspace(ref).store, key, {}, "cfg")
    assert "-redo-" in cache_key(context, params)  # one copy missing: the task runs again
    commit_json(workspace(ref).store, copies[-1], {}, "cfg")
    assert cache_key(context, params) == first  # all committed, positive levels included: Retry shows it Cached
