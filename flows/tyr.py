"""The ``tyr`` flow: one run is the whole coarse-to-fine loop of Týr-the-Pruner (docs/algorithm.md, Alg. 4).

calibrate -> teacher -> for each iteration: plan, build the supernet layer by layer (stats, local prune at
every level through the task runner, accumulate the expectation), search generations, recentre -> garbage-collect ->
export -> evaluate. Every step commits to the store, so a retried or resumed run recomputes nothing committed.
"""

from __future__ import annotations

import time
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.context import SettingsContext, get_settings_context
from prefect.settings import Settings
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from tasks.data import calibrate, teacher
from tasks.evaluate import evaluate, evaluate_baselines, summarize
from tasks.export import export
from tasks.policies import RESULT_SERIALIZER
from tasks.reports import flush_artifacts, start_progress, update_progress
from tasks.search import recentre_interval, search_generation
from tasks.supernet import accumulate, garbage_collect, layer_stats, local_prune, plan, supernet_index
from tyr_core import keys
from tyr_core.config import MAX_CONCURRENT_PRUNES
from tyr_core.store import is_committed
from tyr_runtime.runs import open_run, release_run
from tyr_runtime.workspace import RunRef

from .recipes import resolve_config

# URLs in flow parameters are kept in Prefect's database and shown in its UI: credentials in them (user info, before
# an '@') are refused when the run is created; they come from the AWS chain or a credentials block.
NO_CREDENTIALS = r"^[^@]*$"


@flow(
    name="tyr-iteration",
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_CONCURRENT_PRUNES),
    result_serializer=RESULT_SERIALIZER,  # JSON, never pickles: for its tasks without a policy of their own too
)
def iteration_flow(ref: RunRef, iteration: int, generations: int, committed: bool = False) -> dict:
    """One iteration: supernet around the current centres, then the sparsity-shift search."""
    grid = plan(ref, iteration)
    if not committed:
        build_supernet(ref, iteration, grid)
    progress = start_progress(ref.run_id, iteration, generations)
    for generation in range(1, generations + 1):
        search_generation(ref, iteration, generation)
        update_progress(progress, generation, generations)
    return recentre_interval(ref, iteration, generations)


def build_supernet(ref: RunRef, iteration: int, grid: dict) -> dict:
    """Layer by layer: each layer's inputs carry the expected weights of the layers before it (eq. 5). A layer's
    local-prune tasks (one per level) go through the task runner, ``concurrent_prunes`` at a time.

    With ``concurrent_prunes=1`` (the default) they run in the flow's own thread instead. A task-runner thread that
    runs torch gets an OpenMP team of its own, and once the process has more OpenMP threads than cores, libgomp
    stops spinning at its barriers: every parallel region of every op, in every thread, then waits for workers to
    wake up. On CPU that made the SmolLM2 build 1.16x as long, with 25x the context switches
    (``python bench/prune_thread.py``).
    """
    from tyr_runtime.workspace import workspace

    at_once = workspace(ref).config.concurrent_prunes
    layers = sorted({s["layer"] for s in grid["sublayers"]})
    entries: list[dict] = []
    for layer in layers:
        subs = [s for s in grid["sublayers"] if s["layer"] == layer]
        layer_stats(ref, iteration, layer)
        levels = sorted({lv for s in subs for lv in range(s["lo"], s["hi"] + 1)})
        for batch in (levels[i : i + at_once] for i in range(0, len(levels), at_once)):
            kinds = {lv: [s["kind"] for s in subs if s["lo"] <= lv <= s["hi"]] for lv in batch}
            if at_once == 1:
                entries += local_prune(ref, iteration, layer, batch[0], kinds[batch[0]])
            else:
                futures = [local_prune.submit(ref, iteration, layer, lv, kinds[lv]) for lv in batch]
                entries += [entry for f in futures for entry in f.result()]
        if layer != layers[-1]:
            accumulate(ref, iteration, layer)
    return supernet_index(ref, iteration, entries)


@flow(name="tyr", log_prints=False, result_serializer=RESULT_SERIALIZER)
def tyr(
    model: str | None = None,
    recipe: str | None = None,
    preset: str | None = None,
    target_sparsity: Annotated[float | None, Field(gt=0.0, lt=1.0)] = None,
    iterations: Annotated[int | None, Field(ge=1, le=8)] = None,
    generations: Annotated[int | None, Field(ge=0)] = None,
    offspring: Annotated[int | None, Field(ge=1)] = None,
    run_id: str | None = None,
    store_url: Annotated[str | None, Field(pattern=NO_CREDENTIALS)] = None,
    endpoint_url: Annotated[str | None, Field(pattern=NO_CREDENTIALS)] = None,
    overrides: list[str] | None = None,
) -> dict:
    """Prune ``model`` (a hub name, local folder, GGUF file or alias) to ``target_sparsity`` with ``recipe``'s
    settings, or run a ``preset`` (a shorthand such as smollm2-50, or a config file); flat parameters and
    ``overrides`` (section.field=value) come last. The resolved config is saved as run.json."""
    started = time.perf_counter()
    log = get_run_logger()
    config = resolve_config(
        preset, target_sparsity, iterations, generations, offspring, overrides, model=model, recipe=recipe
    )
    use_torch_threads(config.torch_threads)
    ref = open_run(config, run_id, store_url, endpoint_url)
    log.info("run %s in %s (config %s)", ref.run_id, ref.store_url, config.artefact_hash())
    try:
        calibrate(ref)
        teacher(ref)
        last = config.prune.iterations
        for it in range(1, last + 1):
            result = run_iteration(ref, it, config.search.generations)
            if it == 1:
                evaluate_baselines(ref)  # needs iteration 1's centre copies, before GC removes them
            garbage_collect(ref, it)
            log.info("iteration %d: fitness %s", it, result["fitness"])
        exports = [export_format(ref, last, fmt) for fmt in config.export.formats]
        report = evaluate(ref, last)
        summarize(ref, report, time.perf_counter() - started)
        return {
            "run_id": ref.run_id,
            "store_url": ref.store_url,
            "result": result,
            "exports": exports,
            "report": report,
        }
    finally:
        flush_artifacts()  # while the run's API client is open
        release_run(ref)


def use_torch_threads(threads: int | None) -> None:
    """Size torch's intra-op pool for this run (``torch_threads``; None leaves torch's default). The flow owns its
    process under a worker, so the setting is the run's, not a library's side effect."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def run_iteration(ref: RunRef, iteration: int, generations: int) -> dict:
    """Skip an iteration whose result is committed; otherwise run (or resume) its subflow."""
    from tyr_runtime.workspace import workspace

    store = workspace(ref).store
    if is_committed(store, keys.result_key(iteration)):
        return recentre_interval(ref, iteration, generations)
    committed = is_committed(store, keys.supernet_index_key(iteration))
    # No heartbeats of its own: the subflow runs in this process and thread, so the run's heartbeat already says
    # whether it is alive; a heartbeat thread per subflow would add a thread and events that say nothing more. After a
    # node dies, zombie detection marks the run Crashed; the subflow, like every task run, shows its last state until
    # the run is retried and continues it.
    with _without_heartbeats():
        return iteration_flow(ref, iteration, generations, committed)


_quiet_settings: tuple[Settings, Settings] | None = None  # (the run's settings, the same without heartbeats)


def _without_heartbeats() -> SettingsContext:
    """The current settings with flow heartbeats off, built once per settings object: building Settings (what
    ``temporary_settings`` does on every call) took 0.17 s a subflow, measured with pyinstrument."""
    global _quiet_settings
    context = get_settings_context()
    if _quiet_settings is None or _quiet_settings[0] is not context.settings:
        quiet = context.settings.copy_with_update(updates={"flows.heartbeat_frequency": None})
        _quiet_settings = (context.settings, quiet)
    return SettingsContext(profile=context.profile, settings=_quiet_settings[1])


def export_format(ref: RunRef, iteration: int, fmt: str) -> dict:
    """One export; a layout the format cannot express (e.g. Nemotron-NAS) is reported, not fatal to the run."""
    state = export(ref, iteration, fmt, return_state=True)
    if state.is_completed():
        return state.result()
    get_run_logger().warning("export %s refused: %s", fmt, state.message)
    return {"format": fmt, "refused": state.message}
