"""The end of a run: evaluation of the baselines and of the searched model, and the exports."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tyr_core import keys
from tyr_core.evaluate import perplexity
from tyr_core.export import save_compact, save_masked, save_nemotron, write_sparsity_report
from tyr_core.param_count import dense_params, layout_params
from tyr_core.pipeline import apply_layout, magnitude_layout
from tyr_core.store import commit_bytes, commit_file, is_committed, read_json

from .reports import publish_markdown, summary_markdown
from .steps import IO_RETRIES, _artefact_cache_key
from .workspace import RunRef, dumps, workspace

EXPORTERS = {"compact": save_compact, "masked": save_masked, "nemotron-nas": save_nemotron}


def final_layout(ws, iteration: int):
    result = read_json(ws.store, keys.result_key(iteration))
    return ws.reader(iteration).layout(result["levels"])


@task(name="evaluate-baselines", cache_key_fn=_artefact_cache_key(lambda p: keys.report_key("baselines")), **IO_RETRIES)
def evaluate_baselines(ref: RunRef) -> dict:
    """Dense, uniform (iteration 1's centre copies) and magnitude perplexity, before GC removes iteration 1."""
    ws = workspace(ref)
    key = keys.report_key("baselines")
    if not is_committed(ws.store, key):
        heldout, geo = ws.heldout(), ws.model.geometry
        reader = ws.reader(1)
        model = ws.dense_model()
        report = {"dense_ppl": perplexity(model, heldout), "dense_params": dense_params(ws.model.config)}
        uniform = reader.layout([0] * len(reader.sublayers))
        apply_layout(model, uniform, geo)
        report |= {"uniform_ppl": perplexity(model, heldout), "uniform_params": layout_params(ws.model.config, uniform)}
        model = ws.dense_model()
        apply_layout(model, magnitude_layout(model, geo, reader.sublayers), geo)
        report["magnitude_ppl"] = perplexity(model, heldout)
        commit_bytes(ws.store, key, dumps(report), ws.config.artefact_hash())
    return read_json(ws.store, key)


@task(
    name="evaluate",
    cache_key_fn=_artefact_cache_key(lambda p: keys.report_key(f"final-{p['iteration']}")),
    **IO_RETRIES,
)
def evaluate(ref: RunRef, iteration: int) -> dict:
    """Held-out perplexity and parameter counts of the searched model, next to the baselines."""
    ws = workspace(ref)
    key = keys.report_key(f"final-{iteration}")
    if not is_committed(ws.store, key):
        layout = final_layout(ws, iteration)
        model = ws.dense_model()
        apply_layout(model, layout, ws.model.geometry)
        report = {
            "iteration": iteration,
            "tyr_ppl": perplexity(model, ws.heldout()),
            "tyr_params": layout_params(ws.model.config, layout),
            "baselines": read_json(ws.store, keys.report_key("baselines")),
            "sparsities": read_json(ws.store, keys.result_key(iteration))["sparsities"],
        }
        commit_bytes(ws.store, key, dumps(report), ws.config.artefact_hash())
    return read_json(ws.store, key)


@task(name="export", cache_key_fn=_artefact_cache_key(lambda p: keys.export_prefix(p["fmt"])), **IO_RETRIES)
def export(ref: RunRef, iteration: int, fmt: str) -> dict:
    """Write one export format into the store under ``final/<fmt>/`` (each file committed; marker last)."""
    ws = workspace(ref)
    prefix = keys.export_prefix(fmt)
    marker = prefix + "files.json"
    if not is_committed(ws.store, marker):
        layout = final_layout(ws, iteration)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / fmt
            EXPORTERS[fmt](ws.dense_model(), layout, out, tokenizer=ws.tokenizer())
            if ws.config.export.plot:
                write_sparsity_report(ws.model.config, layout, out)
            files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
            for name in files:
                commit_file(ws.store, prefix + name, out / name, ws.config.artefact_hash())
        commit_bytes(ws.store, marker, dumps({"files": files}), ws.config.artefact_hash())
    return {"format": fmt, "prefix": prefix, "files": read_json(ws.store, marker)["files"]}


@task(name="summarize", cache_policy=NO_CACHE)
def summarize(ref: RunRef, report: dict, wall_s: float) -> None:
    """The final summary artifact: perplexities, parameters, time, and the sparsity plot of the compact export."""
    ws = workspace(ref)
    plot_key = keys.export_prefix("compact") + "sparsity_distribution.png"

    def markdown() -> str:
        plot = ws.fetch(plot_key).read_bytes() if is_committed(ws.store, plot_key) else None
        return summary_markdown(report, wall_s, plot)

    publish_markdown(ref.run_id, "summary", markdown, f"run {ref.run_id}: result")
