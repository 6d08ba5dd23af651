"""What a run has committed, read from its store: progress phases, status and per-iteration results. Pure: no
console and no Prefect; every function takes a ``Store``."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tyr_core import keys
from tyr_core.config import EXPORT_FORMATS, RunConfig
from tyr_core.errors import ConfigError, MissingArtefactError, TyrError
from tyr_core.store import Store, is_committed, read_json

from .lock import lock_is_abandoned


@dataclass
class Phase:
    """One progress bar: a stable id, what people read, and committed work against the plan."""

    id: str
    label: str
    total: int
    done: int


def committed_phases(store: Store, config: RunConfig, plans: dict[int, dict] | None = None) -> list[Phase]:
    """What the run has committed, read from the store's manifests (``plans`` caches immutable plans).

    Setup (calibration, teacher), then per iteration the supernet copies (by layer) and the search generations,
    then the final evaluation and exports. Iterations after the current one are not listed yet.
    """
    plans = {} if plans is None else plans
    setup = [keys.calibration_key(), keys.teacher_index_key()]
    phases = [Phase("setup", "calibration + teacher logits", 2, sum(is_committed(store, k) for k in setup))]
    iterations = config.prune.iterations
    for it in range(1, iterations + 1):
        current = _iteration_phases(store, it, iterations, config.search.generations, plans)
        phases += current
        if not current or not is_committed(store, keys.result_key(it)):
            return phases
    finals = [keys.final_report_key(iterations), *(keys.export_marker_key(f) for f in config.export.formats)]
    phases.append(Phase("finish", "evaluate + export", len(finals), sum(is_committed(store, k) for k in finals)))
    return phases


def _iteration_phases(store: Store, it: int, iterations: int, generations: int, plans: dict[int, dict]) -> list[Phase]:
    if it not in plans:
        if not is_committed(store, keys.plan_key(it)):
            return []
        plans[it] = read_json(store, keys.plan_key(it))
    per_layer = _copy_keys_by_layer(plans[it], it)
    total = sum(len(v) for v in per_layer.values())
    if is_committed(store, keys.result_key(it)):
        copies_done, layers_done, gens_done = total, len(per_layer), generations
    else:
        listed = set(store.list(keys.iteration_prefix(it)))
        built = is_committed(store, keys.supernet_index_key(it))
        done = {layer: sum(keys.manifest_key(k) in listed for k in ks) for layer, ks in per_layer.items()}
        copies_done = total if built else sum(done.values())
        layers_done = len(per_layer) if built else sum(done[layer] == len(ks) for layer, ks in per_layer.items())
        gens = range(1, generations + 1)
        gens_done = sum(keys.manifest_key(keys.search_state_key(it, g)) in listed for g in gens)
    where = f"iteration {it}/{iterations}"
    return [
        Phase(f"{it}/supernet", f"{where}: supernet, layers {layers_done}/{len(per_layer)}", total, copies_done),
        Phase(f"{it}/search", f"{where}: search generations", generations, gens_done),
    ]


def _copy_keys_by_layer(plan: dict, it: int) -> dict[int, list[str]]:
    by_layer: dict[int, list[str]] = {}
    for sub in plan["sublayers"]:
        copies = [keys.copy_key(it, sub["layer"], sub["kind"], lv) for lv in range(sub["lo"], sub["hi"] + 1)]
        by_layer.setdefault(sub["layer"], []).extend(copies)
    return by_layer


def list_run_ids(base: Store) -> list[str]:
    """Ids of the runs under a store base: those with a committed ``run.json``."""
    root = keys.RUNS_ROOT
    marker = keys.manifest_key(keys.RUN_CONFIG)
    found = set()
    for key in base.list(root):
        run_id, _, rest = key[len(root) :].partition("/")
        if rest == marker:
            found.add(run_id)
    return sorted(found)


def bytes_stored(store: Store, listed: list[str]) -> int:
    """Sum of object sizes (S3: one HEAD per key, so in parallel)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return sum(pool.map(lambda key: _size_or_zero(store, key), listed))


def _size_or_zero(store: Store, key: str) -> int:
    try:
        return store.size(key)
    except MissingArtefactError:  # deleted since the listing (GC running)
        return 0


def lock_holder(store: Store) -> dict | None:
    """The live holder of the run's lock, or None when there is no lock or its holder is gone."""
    try:
        lock = json.loads(store.get_bytes(keys.LOCK_KEY))
    except (TyrError, ValueError):  # no lock (or released while we read it)
        return None
    return None if lock_is_abandoned(lock) else lock


def run_summary(store: Store, run_id: str, detail: bool = False, saved: dict | None = None) -> dict:
    """Status, current iteration and generation, per-iteration results, final sparsities and bytes of one run.

    Status: ``complete`` once the final report is committed, ``running`` while a live process holds the run's
    lock, ``incomplete`` otherwise (crashed or stopped: ``tyr prune`` with the same run id resumes it). ``saved``:
    the run's ``run.json`` if the caller has read it already.

    Raises:
        ConfigError: the run does not exist.
    """
    saved = saved or saved_config(store, run_id)
    cfg = saved["config"]
    iterations, generations = cfg["prune"]["iterations"], cfg["search"]["generations"]
    listed = store.list("")
    present = set(listed)
    results = [
        read_json(store, keys.result_key(i))
        for i in range(1, iterations + 1)
        if keys.manifest_key(keys.result_key(i)) in present
    ]
    complete = keys.manifest_key(keys.final_report_key(iterations)) in present
    holder = None if complete else lock_holder(store)
    current = iterations if complete else min(len(results) + 1, iterations)
    gens = range(1, generations + 1)
    generation = sum(keys.manifest_key(keys.search_state_key(current, g)) in present for g in gens)
    summary = {
        "run_id": run_id,
        "status": "complete" if complete else ("running" if holder else "incomplete"),
        "iteration": current,
        "iterations_total": iterations,
        "generation": generation,
        "generations_total": generations,
        "bytes_stored": bytes_stored(store, listed),
        "objects": sum(not keys.is_manifest(k) for k in listed),
    }
    if detail:
        summary |= _details(store, saved, results, present, complete, holder)
    return summary


def saved_config(store: Store, run_id: str) -> dict:
    """The run's committed ``run.json`` (config, artefact hash, incarnation); ``ConfigError`` if there is none."""
    if not is_committed(store, keys.RUN_CONFIG):
        raise ConfigError(f"run {run_id!r} does not exist in {store.url} (no committed {keys.RUN_CONFIG})")
    return read_json(store, keys.RUN_CONFIG)


def _details(
    store: Store, saved: dict, results: list[dict], present: set[str], complete: bool, holder: dict | None
) -> dict:
    iterations = saved["config"]["prune"]["iterations"]
    formats = [f for f in EXPORT_FORMATS if keys.manifest_key(keys.export_marker_key(f)) in present]
    report = read_json(store, keys.final_report_key(iterations)) if complete else None
    # the final model is the best iteration's winner (the report names it), else the latest so far
    chosen = [r for r in results if report and r["iteration"] == report.get("iteration")] or results[-1:]
    return {
        "store_url": store.url,
        "artefact_hash": saved.get("artefact_hash"),
        "iterations": results,
        "final_sparsities": chosen[0]["sparsities"] if chosen else {},
        "final_iteration": chosen[0]["iteration"] if chosen else None,
        "report": report,
        "exports": formats,
        "lock": holder,
        "config": saved["config"],
    }


def finished_iteration(store: Store, run_id: str) -> int:
    """The run's last iteration, whose result must be committed before anything can be exported."""
    iterations = saved_config(store, run_id)["config"]["prune"]["iterations"]
    if not is_committed(store, keys.result_key(iterations)):
        raise ConfigError(
            f"run {run_id!r} has not finished: iteration {iterations}'s result is not committed; resume it with "
            "tyr prune (same command, --run-id) first"
        )
    return iterations
