"""The ``tyr`` flow: one run is the whole coarse-to-fine loop of Týr-the-Pruner (docs/algorithm.md, Alg. 4).

calibrate -> teacher -> for each iteration: plan around the centres, build the supernet layer by layer (stats, local
prune at every level, accumulate the expectation), search generations, recentre -> garbage-collect -> export ->
evaluate. Every step commits to the store, and ``tyr_core.store.remaining`` says what a retried or resumed run still
has to compute; how the steps run in the process (threads, subflow settings, refused exports) is ``_execution.py``.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

from prefect import Flow, flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.callables import get_call_parameters
from pydantic import Field

from tasks.data import calibrate, teacher
from tasks.evaluate import evaluate, evaluate_baselines, summarize
from tasks.policies import RESULT_SERIALIZER
from tasks.reports import flush_artifacts, start_progress, update_progress
from tasks.search import recentre_interval, search_generation, sensitivity_scan
from tasks.supernet import accumulate, garbage_collect, layer_stats, plan, supernet_index
from tyr_core import keys
from tyr_core.config import MAX_CONCURRENT_PRUNES
from tyr_core.errors import ConfigError
from tyr_core.grid import IterationPlan
from tyr_core.store import remaining
from tyr_runtime.runs import open_run, release_run
from tyr_runtime.workspace import RunRef, workspace

from ._execution import export_format, local_prunes, use_torch_threads, without_heartbeats
from .recipes import resolve_config

# URLs in flow parameters are kept in Prefect's database and shown in its UI: credentials in them (user info, before
# an '@') are refused when the run is created; they come from the AWS chain or a credentials block.
NO_CREDENTIALS = r"^[^@]*$"
URL_PARAMETERS = ("store_url", "endpoint_url")


def refuse_credentials(parameters: dict[str, Any]) -> None:
    """Refuse a URL parameter that holds credentials, naming the parameter and never echoing its value.

    Raises:
        ConfigError: ``store_url`` or ``endpoint_url`` has an '@' in it.
    """
    for name in URL_PARAMETERS:
        value = parameters.get(name)
        if isinstance(value, str) and not re.fullmatch(NO_CREDENTIALS, value):
            raise ConfigError(
                f"the flow parameter {name} holds credentials (an '@' in the URL); give them through the AWS chain "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, an instance role) or a credentials block, "
                "never in a URL (flow parameters are logged and kept in Prefect's database)"
            )


class CredentialCheckedFlow(Flow):
    """A flow called from Python checks its URL parameters before Prefect creates the flow run: Prefect validates
    parameters only after it has stored them in its database and logged them. Deployment runs are validated by the
    server against the parameter schema (the ``NO_CREDENTIALS`` pattern) before they are created."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = {k: v for k, v in kwargs.items() if k not in ("return_state", "wait_for")}
        refuse_credentials(get_call_parameters(self.fn, args, call))
        return super().__call__(*args, **kwargs)


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
        report = evaluate(ref, last)  # before the exports: their model cards state its figures
        exports = [export_format(ref, last, fmt) for fmt in config.export.formats]
        summarize(ref, report, time.perf_counter() - started, last)
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


tyr.__class__ = CredentialCheckedFlow  # ``@flow`` makes a plain Flow; entrypoints and deployments still find it


def run_iteration(ref: RunRef, iteration: int, generations: int) -> dict:
    """An iteration's result from its subflow, called even when the result is committed: a retried flow run pairs
    its subflow calls with the earlier subflow runs by their order, so skipping one would hand the next iteration the
    skipped one's result."""
    with without_heartbeats():
        return iteration_flow(ref, iteration, generations)


@flow(
    name="tyr-iteration",
    flow_run_name="iteration-{iteration}",
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_CONCURRENT_PRUNES),
    result_serializer=RESULT_SERIALIZER,  # JSON, never pickles: for its tasks without a policy of their own too
)
def iteration_flow(ref: RunRef, iteration: int, generations: int) -> dict:
    """One iteration: the supernet around the current centres, then the sparsity-shift search and the recentring."""
    if not remaining(workspace(ref).store, keys.result_key(iteration)):
        return recentre_interval(ref, iteration, generations)  # committed: its recentre task returns it
    grid = IterationPlan.from_json(plan(ref, iteration))
    if remaining(workspace(ref).store, keys.supernet_index_key(iteration)):
        build_supernet(ref, grid)
    if workspace(ref).config.search.needs_scan:
        sensitivity_scan(ref, iteration)  # the first parent and the mutation's weights come from it
    progress = start_progress(ref.run_id, iteration, generations)
    for generation in range(1, generations + 1):
        search_generation(ref, iteration, generation)
        update_progress(progress, generation, generations)
    return recentre_interval(ref, iteration, generations)


def build_supernet(ref: RunRef, grid: IterationPlan) -> dict:
    """Layer by layer: each layer's inputs carry the expected weights of the layers before it (eq. 5)."""
    entries: list[dict] = []
    for layer in grid.layers():
        layer_stats(ref, grid.iteration, layer)
        levels = {level: grid.kinds_at(layer, level) for level in grid.levels_of(layer)}
        entries += local_prunes(ref, grid.iteration, layer, levels)  # each sublayer at every level of its grid
        if layer != grid.layers()[-1]:
            accumulate(ref, grid.iteration, layer)
    return supernet_index(ref, grid.iteration, entries)
