"""The search steps of one iteration: one task per generation of the sparsity-shift search, then the winner and the
next iteration's centres."""

from __future__ import annotations

from prefect import task

from tyr_core import keys
from tyr_core.grid import recentre
from tyr_core.search import SearchState, initial_state, run_generation
from tyr_core.store import commit_json_once, commit_once, read_json, read_verified
from tyr_runtime import ray_engine, worker_steps
from tyr_runtime.workspace import RunRef, Workspace, workspace

from .policies import IO_RETRIES, artefact_cache_key
from .reports import iteration_markdown, publish_markdown


@task(
    name="search-generation",
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
        return run_generation(state, genes, evaluate, ws.config.search, n_windows, seq_len).model_dump_json().encode()

    key = keys.search_state_key(iteration, generation)
    state = SearchState.model_validate_json(commit_once(ws.store, key, produce, ws.config.artefact_hash()))
    return {"generation": state.generation, "fitness": state.parent_fitness, "parent": state.parent}


def _previous_state(ws: Workspace, iteration: int, generation: int) -> SearchState:
    if generation > 1:
        prev = keys.search_state_key(iteration, generation - 1)
        return SearchState.model_validate_json(read_verified(ws.store, prev))
    genes = ws.reader(iteration).sublayers
    return initial_state(genes, ws.config.seed + iteration, iteration)


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
