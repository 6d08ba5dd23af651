"""One Prefect task per step of the method. Each is a thin wrapper: resolve inputs from the store, call one
``tyr_core`` function, commit outputs, return a small descriptor (keys, hashes, metrics), never tensors.

Idempotence comes twice: a task whose artefact's manifest exists returns at once (new flow runs of the same
run id), and task results are persisted under a cache key of the run (id, store, incarnation) + artefact key, so
the UI's Retry of the same flow run shows finished tasks as ``Cached`` (docs/reference: PREFECT-S3.md).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import save_file

from tyr_core import keys
from tyr_core.errors import InvalidKeyError, NoSuchBucketError, StoreCredentialsError, StoreError, TyrError
from tyr_core.fitness import TeacherTopK, make_kl_evaluator, write_teacher_topk
from tyr_core.grid import Sublayer, recentre
from tyr_core.pipeline import calibration_windows, initial_centres, plan_iteration
from tyr_core.search import SearchState, initial_state, run_generation
from tyr_core.store import collect_garbage, commit_bytes, commit_file, is_committed, read_json, read_manifest
from tyr_core.supernet import copy_bytes, index_entry

from .assets import resolve_corpus
from .reports import iteration_markdown, publish_markdown
from .workspace import RunRef, cache_scope, dumps, workspace

CODE_VERSION = "1"  # bump when a task's output for the same key changes meaning


def _transient(_task, _task_run, state) -> bool:
    """Retry storage and device hiccups, never tyr's own errors (bad input, corrupt artefact, refusal)."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the failure's details could not be read: retry is the safe choice
        return True
    permanent = (InvalidKeyError, StoreCredentialsError, NoSuchBucketError)
    return not isinstance(error, TyrError) or (isinstance(error, StoreError) and not isinstance(error, permanent))


IO_RETRIES = dict(retries=3, retry_delay_seconds=[2, 10, 30], retry_jitter_factor=0.5, retry_condition_fn=_transient)


def _artefact_cache_key(key_fn):
    """Cache key = run (id, store, incarnation) + artefact key: stable across Retry of the same flow run and across
    new flow runs of the run, never shared with another store's run of that id or a deleted run's."""

    def cache_key(_context, params) -> str:
        return f"tyr-{CODE_VERSION}-{cache_scope(params['ref'])}-{key_fn(params)}".replace("/", "_")

    return cache_key


def _sublayers(plan: dict) -> list[Sublayer]:
    return [Sublayer(**s) for s in plan["sublayers"]]


@task(name="calibrate", cache_key_fn=_artefact_cache_key(lambda p: keys.calibration_key()), **IO_RETRIES)
def calibrate(ref: RunRef) -> dict:
    """Calibration windows (and held-out windows) tokenised once and committed."""
    ws = workspace(ref)
    for name, make in (("tokens", _calibration), ("heldout", _heldout)):
        key = keys.calibration_key(name)
        if not is_committed(ws.store, key):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "w.safetensors"
                save_file({"windows": make(ws).contiguous()}, str(path))
                commit_file(ws.store, key, path, ws.config.artefact_hash())
    return {"key": keys.calibration_key(), "windows": list(ws.calibration().shape)}


def _calibration(ws) -> torch.Tensor:
    cfg = ws.config.calibration
    return calibration_windows(cfg.model_copy(update={"files": resolve_corpus(cfg.files)}), ws.tokenizer())


def _heldout(ws) -> torch.Tensor:
    from tyr_core.calibration import eval_windows, load_documents

    ev = ws.config.eval
    docs = load_documents(resolve_corpus(ev.files), ev.dataset, ev.dataset_config, ev.split, ev.text_field)
    return eval_windows(ws.tokenizer(), docs, ev.seq_len)[: ev.max_windows]


@task(name="teacher", cache_key_fn=_artefact_cache_key(lambda p: keys.teacher_index_key()), **IO_RETRIES)
def teacher(ref: RunRef) -> dict:
    """The dense model's top-k logits on every calibration window (fp16 values, int32 ids), in shards."""
    ws = workspace(ref)
    if is_committed(ws.store, keys.teacher_index_key()):
        return read_json(ws.store, keys.teacher_index_key())
    dense = ws.dense_model()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        index = write_teacher_topk(
            lambda ids: dense(ids).logits,
            ws.calibration()[: ws.config.teacher.max_windows],  # the windows the search scores on (None: all)
            ws.config.teacher.topk,
            out,
            ws.config.teacher.windows_per_shard,
        )
        for shard in sorted(out.glob("*.safetensors")):
            commit_file(ws.store, f"teacher/{shard.name}", shard, ws.config.artefact_hash())
        commit_file(ws.store, keys.teacher_index_key(), out / "index.json", ws.config.artefact_hash())
    return read_json(ws.store, keys.teacher_index_key()) if index is not None else {}


@task(name="plan", cache_key_fn=_artefact_cache_key(lambda p: keys.plan_key(p["iteration"])), **IO_RETRIES)
def plan(ref: RunRef, iteration: int) -> dict:
    """Centres and level grids of one iteration: uniform at first, then the previous winner (recentring)."""
    ws = workspace(ref)
    key = keys.plan_key(iteration)
    if not is_committed(ws.store, key):
        geo, cfg = ws.model.geometry, ws.config.prune
        if iteration == 1:
            centres = initial_centres(geo, cfg)
        else:
            centres = read_json(ws.store, keys.result_key(iteration - 1))["next_centres"]
        subs = plan_iteration(geo, cfg, iteration, centres)
        commit_bytes(
            ws.store,
            key,
            dumps({"iteration": iteration, "sublayers": [vars(s) for s in subs]}),
            ws.config.artefact_hash(),
        )
    return ws.plan(iteration)


@task(name="layer-stats", cache_policy=NO_CACHE)
def layer_stats(ref: RunRef, iteration: int, layer: int) -> dict:
    """H of o_proj and down_proj for one layer, kept in this worker for its local-prune tasks."""
    ws = workspace(ref)
    subs = _sublayers(ws.plan(iteration))
    cursor = ws.cursor(iteration, subs)
    cursor.seek(layer, subs, lambda lyr: ws.copies(iteration, subs, lyr))
    return {kind: int(h.shape[0]) for kind, h in cursor.hessians().items()}


def _copy_keys(params: dict) -> str:
    return "+".join(keys.copy_key(params["iteration"], params["layer"], k, params["level"]) for k in params["kinds"])


@task(name="local-prune", cache_key_fn=_artefact_cache_key(_copy_keys), **IO_RETRIES)
def local_prune(ref: RunRef, iteration: int, layer: int, level: int, kinds: list[str]) -> list[dict]:
    """One layer at one level (ARCHITECTURE.md: a task per (layer, sparsity level)): a compact pruned copy of each
    of its sublayers in ``kinds`` (those whose grid has the level), each committed; returns their index entries.

    One task for a layer's attention and MLP at a level rather than one per sublayer halves the task runs (720 per
    iteration of a 70B model, 80 layers x 9 levels, instead of 1,440) and with them the orchestration cost, not the
    parallelism: the flow submits a layer's levels together, ``concurrent_prunes`` at a time. Each copy commits on
    its own, so a retried task skips the committed one.
    """
    ws = workspace(ref)
    subs = _sublayers(ws.plan(iteration))
    entries = []
    for kind in kinds:
        key = keys.copy_key(iteration, layer, kind, level)
        if is_committed(ws.store, key):  # committed by an attempt whose task result was lost (killed right after)
            manifest = read_manifest(ws.store, key)
            entries.append({**manifest.meta, "sha256": manifest.sha256})
            continue
        cursor = ws.cursor(iteration, subs)
        cursor.seek(layer, subs, lambda lyr: ws.copies(iteration, subs, lyr))
        sub = next(s for s in subs if s.layer == layer and s.kind == kind)
        copy = cursor.prune(sub, level)
        data = copy_bytes(copy)
        entry = index_entry(sub, level, copy, ws.model.geometry, key, "", len(data))
        manifest = commit_bytes(ws.store, key, data, ws.config.artefact_hash(), meta=entry)  # or raises: other bytes
        ws.keep_committed_copy(key, copy)  # for this layer's accumulate
        entries.append({**entry, "sha256": manifest.sha256})
    return entries


@task(name="accumulate", cache_policy=NO_CACHE)
def accumulate(ref: RunRef, iteration: int, layer: int) -> int:
    """Advance the calibration activations past ``layer`` with its expected weights (paper eq. 5)."""
    ws = workspace(ref)
    subs = _sublayers(ws.plan(iteration))
    cursor = ws.cursor(iteration, subs)
    cursor.seek(layer + 1, subs, lambda lyr: ws.copies(iteration, subs, lyr))
    return cursor.layer


@task(
    name="supernet-index",
    cache_key_fn=_artefact_cache_key(lambda p: keys.supernet_index_key(p["iteration"])),
    **IO_RETRIES,
)
def supernet_index(ref: RunRef, iteration: int, entries: list[dict]) -> dict:
    """Commit the checksummed index that defines the supernet's search space."""
    ws = workspace(ref)
    ws.end_build()  # the activations and the last layer's held copies (no accumulate replays it) are not needed again
    key = keys.supernet_index_key(iteration)
    if not is_committed(ws.store, key):
        plan_ = ws.plan(iteration)
        index = {
            "iteration": iteration,
            "config_hash": ws.config.artefact_hash(),
            "accumulation": ws.config.prune.accumulation,
            "sublayers": plan_["sublayers"],
            # hashes from the manifests, which are the commit, not from the task results that carried them here
            "copies": sorted(
                ({**e, "sha256": read_manifest(ws.store, e["key"]).sha256} for e in entries),
                key=lambda e: (e["layer"], e["kind"], e["level"]),
            ),
        }
        commit_bytes(ws.store, key, dumps(index), ws.config.artefact_hash())
    index = read_json(ws.store, key)
    return {"key": key, "copies": len(index["copies"]), "bytes": sum(e["bytes"] for e in index["copies"])}


@task(
    name="search-generation",
    cache_key_fn=_artefact_cache_key(lambda p: keys.search_state_key(p["iteration"], p["generation"])),
    **IO_RETRIES,
)
def search_generation(ref: RunRef, iteration: int, generation: int) -> dict:
    """One generation of the sparsity-shift search, resumed from the previous committed state."""
    ws = workspace(ref)
    key = keys.search_state_key(iteration, generation)
    if not is_committed(ws.store, key):
        state = _previous_state(ws, iteration, generation)
        sm, forward = ws.search_model(iteration)
        teacher_ = _teacher(ws)
        windows = ws.calibration()[: teacher_.index["windows"]]
        forward.set_reference(state.parent)  # offspring share the parent's unchanged layers
        evaluate = make_kl_evaluator(sm.apply, forward.logits, windows, teacher_)
        genes = sm.reader.sublayers
        state = run_generation(state, genes, evaluate, ws.config.search, windows.shape[0], windows.shape[1])
        commit_bytes(ws.store, key, state.model_dump_json().encode(), ws.config.artefact_hash())
    state = SearchState.model_validate_json(ws.store.get_bytes(key))
    return {"generation": state.generation, "fitness": state.parent_fitness, "parent": state.parent}


def _previous_state(ws, iteration: int, generation: int) -> SearchState:
    if generation > 1:
        prev = keys.search_state_key(iteration, generation - 1)
        return SearchState.model_validate_json(ws.store.get_bytes(prev))
    genes = ws.reader(iteration).sublayers
    return initial_state(genes, ws.config.seed + iteration, iteration)


def _teacher(ws) -> TeacherTopK:
    index = read_json(ws.store, keys.teacher_index_key())
    for shard in index["shards"]:
        ws.fetch(f"teacher/{shard}")
    ws.fetch(keys.teacher_index_key())
    return TeacherTopK(ws.cache / "teacher")


@task(name="recentre", cache_key_fn=_artefact_cache_key(lambda p: keys.result_key(p["iteration"])), **IO_RETRIES)
def recentre_interval(ref: RunRef, iteration: int, generations: int) -> dict:
    """The iteration's winner: per-sublayer sparsity, and the centres of the next (halved) interval."""
    ws = workspace(ref)
    key = keys.result_key(iteration)
    if not is_committed(ws.store, key):
        state = _previous_state(ws, iteration, generations + 1)  # the last generation's (the start if there were none)
        subs = ws.reader(iteration).sublayers
        result = {
            "iteration": iteration,
            "levels": state.parent,
            "fitness": state.parent_fitness,
            "sparsities": {s.name: s.sparsity(lv) for s, lv in zip(subs, state.parent, strict=True)},
            "next_centres": recentre(subs, state.parent),
        }
        commit_bytes(ws.store, key, dumps(result), ws.config.artefact_hash())
    result = read_json(ws.store, key)
    history = _previous_state(ws, iteration, generations + 1).history if generations else []
    publish_markdown(
        ref.run_id,
        f"iteration-{iteration}",
        lambda: iteration_markdown(result, [h.model_dump() for h in history]),
        f"run {ref.run_id}, iteration {iteration}: per-layer sparsity and fitness",
    )
    return result


@task(name="garbage-collect", cache_policy=NO_CACHE, **IO_RETRIES)
def garbage_collect(ref: RunRef, iteration: int) -> dict:
    """Delete earlier iterations' stats and supernets once this iteration's result is committed."""
    ws = workspace(ref)
    report = collect_garbage(ws.store, iteration, ws.config.keep_last)
    return {"bytes_freed": report.bytes_freed, "keys_deleted": report.keys_deleted}
