"""The supernet steps of one iteration: its plan, then layer by layer the statistics, the local prunes at every level
and the accumulation of the expected weights, then the checksummed index; and the GC of earlier iterations."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tyr_core import keys
from tyr_core.grid import IterationPlan
from tyr_core.pipeline import initial_centres, plan_iteration
from tyr_core.store import collect_garbage, commit_json_once, read_json, read_manifest
from tyr_runtime import ray_engine, worker_steps
from tyr_runtime.workspace import RunRef, workspace

from .policies import IO_RETRIES, artefact_cache_key


@task(name="plan", cache_key_fn=artefact_cache_key(lambda p: keys.plan_key(p["iteration"])), **IO_RETRIES)
def plan(ref: RunRef, iteration: int) -> dict:
    """Centres and level grids of one iteration: uniform at first, then the previous winner (recentring). Its result
    is the plan artefact's JSON (``IterationPlan.from_json`` types it), as a Cached result reads back too."""
    ws = workspace(ref)

    def produce() -> dict:
        geo, cfg, attention = ws.model.geometry, ws.config.prune, ws.config.search.attention
        if iteration == 1:
            centres = initial_centres(geo, cfg, attention)
        else:
            centres = read_json(ws.store, keys.result_key(iteration - 1))["next_centres"]
        return IterationPlan(iteration, tuple(plan_iteration(geo, cfg, iteration, centres, attention))).to_json()

    return commit_json_once(ws.store, keys.plan_key(iteration), produce, ws.config.artefact_hash())


def _step(ref: RunRef, step: str, *args):
    """A build step in this process (engine local) or on the run's build actor (engine ray), which owns the layer
    cursor there; either way the copies commit conditionally, so a step that runs twice commits nothing twice."""
    engine = ray_engine.engine_for(ref)
    if engine is None:
        return getattr(worker_steps, step)(ref, *args)
    return engine.build(step, *args)


# A run's name is its task's, '-', and a suffix (the layer, a generation, a format) without '-', nemotron-nas's aside:
# tools that group task runs by task take the name before the last '-', as in Prefect's default names.
@task(name="layer-stats", task_run_name="layer-stats-layer{layer}", cache_policy=NO_CACHE)
def layer_stats(ref: RunRef, iteration: int, layer: int) -> dict:
    """H of o_proj and down_proj for one layer, kept in the worker for its local-prune tasks."""
    return _step(ref, "layer_stats", iteration, layer)


def _copy_keys(params: dict) -> list[str]:
    it, layer = params["iteration"], params["layer"]
    return [keys.copy_key(it, layer, k, lv) for lv, kinds in params["levels"].items() for k in kinds]


@task(
    name="local-prune",
    task_run_name="local-prune-layer{layer}",
    cache_key_fn=artefact_cache_key(_copy_keys),
    **IO_RETRIES,
)
def local_prune(ref: RunRef, iteration: int, layer: int, levels: dict[int, list[str]]) -> list[dict]:
    """One layer at some of its levels (``levels``: level -> the sublayers whose grid has it): a compact pruned copy
    of each, each committed; returns their index entries, in level order.

    One task holds a share of a layer's levels (all of them with ``concurrent_prunes=1``), not one level: a small
    model's copy takes a fraction of a second, about what a task run costs in states, events and logs, here and on the
    server. Each copy commits on its own, so a retried task skips the committed ones.
    """
    return [
        entry for level, kinds in levels.items() for entry in _step(ref, "local_prune", iteration, layer, level, kinds)
    ]


@task(name="accumulate", task_run_name="accumulate-layer{layer}", cache_policy=NO_CACHE)
def accumulate(ref: RunRef, iteration: int, layer: int) -> int:
    """Advance the calibration activations past ``layer`` with its expected weights (paper eq. 5)."""
    return _step(ref, "accumulate", iteration, layer)


@task(
    name="supernet-index",
    cache_key_fn=artefact_cache_key(lambda p: keys.supernet_index_key(p["iteration"])),
    **IO_RETRIES,
)
def supernet_index(ref: RunRef, iteration: int, entries: list[dict]) -> dict:
    """Commit the checksummed index that defines the supernet's search space."""
    ws = workspace(ref)
    if (engine := ray_engine.engine_for(ref)) is not None:
        engine.build("end_build")
    ws.end_build()  # the activations and the last layer's held copies (no accumulate replays it) are not needed again

    def produce() -> dict:
        return {
            "iteration": iteration,
            "config_hash": ws.config.artefact_hash(),
            "accumulation": ws.config.prune.accumulation,
            "sublayers": ws.plan(iteration)["sublayers"],
            # hashes from the manifests, which are the commit, not from the task results that carried them here
            "copies": sorted(
                ({**e, "sha256": read_manifest(ws.store, e["key"]).sha256} for e in entries),
                key=lambda e: (e["layer"], e["kind"], e["level"]),
            ),
        }

    key = keys.supernet_index_key(iteration)
    index = commit_json_once(ws.store, key, produce, ws.config.artefact_hash())
    return {"key": key, "copies": len(index["copies"]), "bytes": sum(e["bytes"] for e in index["copies"])}


@task(name="garbage-collect", cache_policy=NO_CACHE, **IO_RETRIES)
def garbage_collect(ref: RunRef, iteration: int) -> dict:
    """Delete earlier iterations' stats and supernets once this iteration's result is committed."""
    ws = workspace(ref)
    report = collect_garbage(ws.store, iteration, ws.config.keep_last)
    return {"bytes_freed": report.bytes_freed, "keys_deleted": report.keys_deleted}
