"""Prefect artifacts for people watching a run in the UI: search progress, one markdown table per iteration
(per-layer sparsity, fitness per generation) and the final summary (perplexity, parameters, time, the sparsity
plot). The markdown is built by pure functions; publishing never fails a run (artifacts are for reading, the
store holds the results), and the run does not wait for it: each artifact is a request to the server (0.1-0.2 s on
loopback while the server records the run's events, measured with pyinstrument), sent from one background thread in
order, and the flow waits for what is still pending only once, before it ends (``flush_artifacts``).
"""

from __future__ import annotations

import base64
import contextvars
import logging
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any
from uuid import UUID

log = logging.getLogger(__name__)

# one thread: artifacts reach the server in the order they were published (a progress bar's updates after its creation)
_publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tyr-artifacts")
_pending: list[Future] = []


def artifact_key(run_id: str, name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"tyr-{run_id}-{name}".lower()).strip("-")


def per_layer(sparsities: dict[str, float]) -> dict[int, dict[str, float]]:
    """``{"model.layers.3.mlp": 0.5, ...}`` as ``{3: {"mlp": 0.5, ...}}``."""
    layers: dict[int, dict[str, float]] = {}
    for name, value in sparsities.items():
        prefix, _, kind = name.rpartition(".")
        layers.setdefault(int(prefix.rsplit(".", 1)[-1]), {})[kind] = value
    return dict(sorted(layers.items()))


def _fitness(value: float | None) -> str:
    return "not scored (no generations)" if value is None else f"{value:.5g}"


def iteration_markdown(result: dict, history: list[dict]) -> str:
    """One iteration's winner: per-layer attention and MLP sparsity, and the parent's fitness per generation."""
    lines = [
        f"# Iteration {result['iteration']}",
        "",
        f"Winner's fitness (top-k KL to the dense model, lower is better): **{_fitness(result['fitness'])}**",
        "",
    ]
    if "removed_fraction" in result:  # physically, as the export removes them, beside the target it was searched for
        lines += [
            f"Decoder parameters physically removed: {result['removed_fraction']:.2%} (target "
            f"{result['target_sparsity']:.2%} of the {'parameters' if result['budget'] == 'params' else 'groups'}).",
            "",
        ]
    lines += [
        "| layer | attention sparsity | MLP sparsity |",
        "|---:|---:|---:|",
    ]
    for layer, row in per_layer(result["sparsities"]).items():
        lines.append(f"| {layer} | {row.get('self_attn', 0.0):.1%} | {row.get('mlp', 0.0):.1%} |")
    if history:
        lines += ["", "| generation | fitness | offspring | evaluations |", "|---:|---:|---:|---:|"]
        lines += [
            f"| {h['generation']} | {h['fitness']:.5g} | {h['candidates']} | {h['evaluations']} |" for h in history
        ]
    return "\n".join(lines)


def _ppl(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _target(target_sparsity: float | None, budget: str | None) -> str:
    if target_sparsity is None:
        return ""
    of = "the decoder's parameters" if budget == "params" else "attention heads and MLP neurons"
    return f"Target: {target_sparsity:.1%} of {of}. "


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _chosen_iteration(chosen: int, iterations: list[dict]) -> list[str]:
    """Every iteration's search and validation KL, the chosen one marked, and the rule that chose it."""
    if not iterations:
        return [f"Final model: iteration {chosen}."]
    lines = [
        f"Iterations run: {len(iterations)}. Final model: iteration {chosen}, the lowest validation KL (the winner's "
        "top-k KL to the dense model on every validation window, the same windows for each iteration; the search KL "
        "covers the search's last minibatch only).",
        "",
        "| iteration | search KL | validation KL |",
        "|---:|---:|---:|",
    ]
    for r in iterations:
        mark = "**" if r["iteration"] == chosen else ""
        cells = [str(r["iteration"]), _fitness(r.get("fitness")), _fitness(r.get("validation_fitness"))]
        lines.append("| " + " | ".join(f"{mark}{c}{mark}" for c in cells) + " |")
    return lines


def summary_markdown(
    report: dict,
    wall_s: float,
    plot_png: bytes | None = None,
    iterations: list[dict] | None = None,
    target_sparsity: float | None = None,
    budget: str | None = None,
) -> str:
    """The run's result next to its baselines; the target beside what was physically removed; the chosen iteration
    beside the others (``iterations``: each iteration's result, with its search and validation KL); the wall time of
    the flow run; the sparsity plot."""
    base = report["baselines"]
    params = report["tyr_params"]
    dense_total = base["dense_params"]["total"]
    lines = [
        "# tyr: result",
        "",
        "| model | held-out perplexity | parameters |",
        "|---|---:|---:|",
        f"| dense | {_ppl(base.get('dense_ppl'))} | {dense_total:,} |",
        f"| magnitude, uniform | {_ppl(base.get('magnitude_ppl'))} | - |",
        f"| Týr local pruner, uniform | {_ppl(base.get('uniform_ppl'))} | {base['uniform_params']['total']:,} |",
        f"| **tyr (searched)** | **{_ppl(report.get('tyr_ppl'))}** | **{params['total']:,}** |",
        "",
        f"{_target(target_sparsity, budget)}Physically removed: {params['removed']:,} parameters, "
        f"{params['removed_fraction']:.1%} of the decoder layers' and {1 - params['total'] / dense_total:.1%} of the "
        f"model's ({dense_total:,} -> {params['total']:,}; embeddings, lm_head and the final norm are never pruned).",
        "",
        *_chosen_iteration(report["iteration"], iterations or []),
        "",
        f"Wall time of this flow run: {_duration(wall_s)}.",
    ]
    if plot_png:
        encoded = base64.b64encode(plot_png).decode()
        lines += ["", f"![per-layer sparsity](data:image/png;base64,{encoded})"]
    return "\n".join(lines)


def _guarded(make: Callable[[], Any], what: str) -> Any:
    try:
        return make()
    except Exception as err:  # the UI's view of the run; the run itself is in the store
        log.warning("could not publish the %s artifact: %s", what, err)
        return None


def _publish(make: Callable[[], Any], what: str) -> Future:
    """Run ``make`` on the publisher thread in the caller's context: the flow or task run the artifact belongs to, and
    its API client."""
    future = _publisher.submit(contextvars.copy_context().run, _guarded, make, what)
    _pending.append(future)
    return future


def flush_artifacts(timeout_s: float = 60.0) -> None:
    """Wait until the artifacts published so far have reached the server (or failed, which is logged); the flow calls
    this before it ends, while its API client is open."""
    _, late = wait(list(_pending), timeout=timeout_s)
    if late:
        log.warning("%d artifacts were still being published after %.0f s; not waiting for them", len(late), timeout_s)
    _pending[:] = [f for f in _pending if not f.done()]


def publish_markdown(run_id: str, name: str, markdown: Callable[[], str], description: str) -> None:
    """``markdown`` is built inside the guard: a report that cannot be built or read is logged, not raised."""
    from prefect.artifacts import create_markdown_artifact

    key = artifact_key(run_id, name)
    _publish(lambda: create_markdown_artifact(markdown(), key=key, description=description), name)


def start_progress(run_id: str, iteration: int, generations: int) -> Future:
    """A progress artifact for one iteration's search (0-100%), updated after every generation; the future holds its
    id (None if it could not be created)."""
    from prefect.artifacts import create_progress_artifact

    key = artifact_key(run_id, f"search-{iteration}")
    description = f"iteration {iteration}: generations of the sparsity-shift search done, of {generations}"
    return _publish(lambda: create_progress_artifact(0.0, key=key, description=description), "progress")


def update_progress(progress: Future, done: int, total: int) -> None:
    from prefect.artifacts import update_progress_artifact

    def update() -> UUID | None:
        artifact_id = progress.result()  # published before this update, on the same thread: already done
        if artifact_id is not None and total > 0:
            update_progress_artifact(artifact_id, 100.0 * done / total)
        return artifact_id

    _publish(update, "progress")
