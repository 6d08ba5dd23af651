"""The search steps of one iteration: the sensitivity scan (when the search uses it), one task per generation of the
sparsity-shift search, then the winner and the next iteration's centres."""

from __future__ import annotations

from prefect import task

from tyr_core import keys
from tyr_core.budget import ParamBudget
from tyr_core.grid import Sublayer, recentre
from tyr_core.pipeline import search_budget
from tyr_core.search import SearchGuide, SearchState, initial_state, run_generation
from tyr_core.sensitivity import SensitivityScan, make_guide, run_scan, scan_window_ids, start_levels
from tyr_core.store import commit_json_once, commit_once, read_json, read_verified
from tyr_runtime import ray_engine, worker_steps
from tyr_runtime.workspace import RunRef, Workspace, workspace

from .policies import IO_RETRIES, artefact_cache_key
from .reports import iteration_markdown, publish_markdown


@task(
    name="sensitivity-scan",
    cache_key_fn=artefact_cache_key(lambda p: keys.sensitivity_key(p["iteration"])),
    **IO_RETRIES,
)
def sensitivity_scan(ref: RunRef, iteration: int) -> dict:
    """Every gene one level denser and sparser than the centres, scored on fixed validation windows, before the
    iteration's first generation; its cost is reported beside the search's."""
    ws = workspace(ref)

    def produce() -> dict:
        genes = ws.reader(iteration).sublayers
        centres = [0] * len(genes)
        evaluate, (n_windows, seq_len) = _evaluator(ref, iteration, centres)
        ids = scan_window_ids(ws.config.search.scan_tokens, n_windows, seq_len)
        return run_scan(centres, genes, evaluate, ids, iteration, seq_len).model_dump(mode="json")

    scan = commit_json_once(ws.store, keys.sensitivity_key(iteration), produce, ws.config.artefact_hash())
    return {"iteration": iteration, "evaluations": scan["evaluations"], "tokens": scan["tokens"]}


@task(
    name="search-generation",
    task_run_name="search-generation-gen{generation}",
    cache_key_fn=artefact_cache_key(lambda p: keys.search_state_key(p["iteration"], p["generation"])),
    **IO_RETRIES,
)
def search_generation(ref: RunRef, iteration: int, generation: int) -> dict:
    """One generation of the sparsity-shift search, resumed from the previous committed state."""
    ws = workspace(ref)

    def produce() -> bytes:
        state = _previous_state(ws, iteration, generation)
        evaluate, (n_windows, seq_len) = _evaluator(ref, iteration, state.parent)  # offspring share the parent's layers
        genes = ws.reader(iteration).sublayers
        guide = _guide(ws, iteration, genes)
        cfg = ws.config.search
        return run_generation(state, genes, evaluate, cfg, n_windows, seq_len, guide=guide).model_dump_json().encode()

    key = keys.search_state_key(iteration, generation)
    state = SearchState.model_validate_json(commit_once(ws.store, key, produce, ws.config.artefact_hash()))
    return {"generation": state.generation, "fitness": state.parent_fitness, "parent": state.parent}


def _previous_state(ws: Workspace, iteration: int, generation: int) -> SearchState:
    if generation > 1:
        prev = keys.search_state_key(iteration, generation - 1)
        return SearchState.model_validate_json(read_verified(ws.store, prev))
    genes = ws.reader(iteration).sublayers
    start = start_levels(ws.config.search, genes, _scan(ws, iteration), _budget(ws, iteration, genes))
    return initial_state(genes, ws.config.seed + iteration, iteration, start)


def _scan(ws: Workspace, iteration: int) -> SensitivityScan | None:
    if not ws.config.search.needs_scan:
        return None
    return SensitivityScan.model_validate(read_json(ws.store, keys.sensitivity_key(iteration)))


def _budget(ws: Workspace, iteration: int, genes: list[Sublayer], always: bool = False) -> ParamBudget | None:
    if ws.config.prune.budget != "params" and not always:
        return None
    index = read_json(ws.store, keys.supernet_index_key(iteration))
    return search_budget(ws.model.geometry, index, genes, ws.config.prune, always)


def _guide(ws: Workspace, iteration: int, genes: list[Sublayer]) -> SearchGuide | None:
    return make_guide(ws.config.search, genes, _scan(ws, iteration), _budget(ws, iteration, genes))


def _evaluator(ref: RunRef, iteration: int, reference: list[int]):
    """The search's evaluator and its windows' (count, length): the search model in this process (engine local), or
    the run's Ray replicas (engine ray), which add up the same float terms in the same order."""
    engine = ray_engine.engine_for(ref)
    if engine is None:
        evaluate = worker_steps.search_evaluator(ref, iteration, reference)
        return evaluate, tuple(evaluate.windows.shape)
    ws = workspace(ref)
    n_windows = min(read_json(ws.store, keys.teacher_index_key())["windows"], ws.search_windows().shape[0])
    return engine.evaluator(iteration, reference), (n_windows, ws.search_windows().shape[1])


def _validation_fitness(ref: RunRef, iteration: int, levels: list[int]) -> float:
    evaluate, (n_windows, _) = _evaluator(ref, iteration, levels)
    return evaluate(levels, list(range(n_windows)))


@task(name="recentre", cache_key_fn=artefact_cache_key(lambda p: keys.result_key(p["iteration"])), **IO_RETRIES)
def recentre_interval(ref: RunRef, iteration: int, generations: int) -> dict:
    """The iteration's winner: per-sublayer sparsity, its fitness on every validation window (which picks the
    run's final model across iterations), and the centres of the next (halved) interval."""
    ws = workspace(ref)

    def produce() -> dict:
        state = _previous_state(ws, iteration, generations + 1)  # the last generation's (the start if there were none)
        subs = ws.reader(iteration).sublayers
        return {
            "iteration": iteration,
            "levels": state.parent,
            "fitness": state.parent_fitness,
            "validation_fitness": _validation_fitness(ref, iteration, state.parent),
            "removed_fraction": _budget(ws, iteration, subs, always=True).removed_fraction(state.parent),
            "target_sparsity": ws.config.prune.target_sparsity,
            "budget": ws.config.prune.budget,
            "sparsities": {s.name: s.sparsity(lv) for s, lv in zip(subs, state.parent, strict=True)},
            "next_centres": recentre(subs, state.parent),
        }

    result = commit_json_once(ws.store, keys.result_key(iteration), produce, ws.config.artefact_hash())
    history = _previous_state(ws, iteration, generations + 1).history if generations else []
    publish_markdown(
        ref.run_id,
        f"iteration-{iteration}",
        lambda: iteration_markdown(result, [h.model_dump() for h in history]),
        f"run {ref.run_id}, iteration {iteration}: per-layer sparsity and fitness",
    )
    return result
