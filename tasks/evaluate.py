"""The evaluation steps: held-out perplexity and parameters of the baselines and of the searched model, and the
run's summary in the Prefect UI."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tyr_core import keys
from tyr_core.evaluate import perplexity
from tyr_core.export.plot import PNG_NAME
from tyr_core.param_count import dense_params, layout_params
from tyr_core.pipeline import apply_layout, magnitude_layout
from tyr_core.store import best_iteration, commit_json_once, is_committed, read_json
from tyr_core.sublayer_layout import PrunedLayout
from tyr_runtime.workspace import RunRef, Workspace, workspace

from .policies import IO_RETRIES, artefact_cache_key
from .reports import publish_markdown, summary_markdown


def final_layout(ws: Workspace, last: int) -> PrunedLayout:
    """The searched model's layout: the winning levels of the best iteration up to ``last``, from its supernet."""
    best = best_iteration(ws.store, last)
    result = read_json(ws.store, keys.result_key(best))
    return ws.reader(best).layout(result["levels"])


@task(name="evaluate-baselines", cache_key_fn=artefact_cache_key(lambda p: keys.baselines_report_key()), **IO_RETRIES)
def evaluate_baselines(ref: RunRef) -> dict:
    """Dense, uniform (iteration 1's centre copies) and magnitude perplexity, before GC removes iteration 1."""
    ws = workspace(ref)

    def produce() -> dict:
        heldout, geo = ws.heldout(), ws.model.geometry
        reader = ws.reader(1)
        model, logits = ws.forward_model()
        report = {
            "dense_ppl": perplexity(model, heldout, logits_fn=logits),
            "dense_params": dense_params(ws.model.config),
        }
        uniform = reader.layout([0] * len(reader.sublayers))
        apply_layout(model, uniform, geo)
        report |= {
            "uniform_ppl": perplexity(model, heldout, logits_fn=logits),
            "uniform_params": layout_params(ws.model.config, uniform),
        }
        model, logits = ws.forward_model()
        apply_layout(model, magnitude_layout(model, geo, reader.sublayers), geo)
        report["magnitude_ppl"] = perplexity(model, heldout, logits_fn=logits)
        return report

    return commit_json_once(ws.store, keys.baselines_report_key(), produce, ws.config.artefact_hash())


@task(
    name="evaluate",
    cache_key_fn=artefact_cache_key(lambda p: keys.final_report_key(p["iteration"])),
    **IO_RETRIES,
)
def evaluate(ref: RunRef, iteration: int) -> dict:
    """Held-out perplexity and parameter counts of the searched model, next to the baselines."""
    ws = workspace(ref)

    def produce() -> dict:
        best = best_iteration(ws.store, iteration)
        layout = final_layout(ws, iteration)
        model, logits = ws.forward_model()
        apply_layout(model, layout, ws.model.geometry)
        return {
            "iteration": best,
            "tyr_ppl": perplexity(model, ws.heldout(), logits_fn=logits),
            "tyr_params": layout_params(ws.model.config, layout),
            "baselines": read_json(ws.store, keys.baselines_report_key()),
            "sparsities": read_json(ws.store, keys.result_key(best))["sparsities"],
        }

    return commit_json_once(ws.store, keys.final_report_key(iteration), produce, ws.config.artefact_hash())


@task(name="summarize", cache_policy=NO_CACHE)
def summarize(ref: RunRef, report: dict, wall_s: float, iterations: int) -> None:
    """The final summary artifact: perplexities, target and parameters removed, the chosen iteration beside the
    ``iterations`` run, time, and the sparsity plot of the compact export."""
    ws = workspace(ref)
    plot_key = keys.export_file_key("compact", PNG_NAME)

    def markdown() -> str:
        plot = ws.fetch(plot_key).read_bytes() if is_committed(ws.store, plot_key) else None
        results = [read_json(ws.store, keys.result_key(it)) for it in range(1, iterations + 1)]
        prune = ws.config.prune
        return summary_markdown(report, wall_s, plot, results, prune.target_sparsity, prune.budget)

    publish_markdown(ref.run_id, "summary", markdown, f"run {ref.run_id}: result")
