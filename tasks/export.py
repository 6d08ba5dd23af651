"""The export step: the searched model written in one format into the store, with its model card, every file
committed, its file list last."""

from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path

from prefect import task

from tyr_core import keys
from tyr_core.export import (
    CardFacts,
    save_compact,
    save_gguf,
    save_masked,
    save_nemotron,
    write_model_card,
    write_sparsity_report,
)
from tyr_core.export.plot import PNG_NAME
from tyr_core.param_count import dense_params, layout_params
from tyr_core.store import canonical_json, commit_file, commit_once, is_committed, read_json
from tyr_core.sublayer_layout import PrunedLayout
from tyr_runtime.workspace import RunRef, Workspace, workspace

from .evaluate import final_layout
from .policies import IO_RETRIES, artefact_cache_key


def _exporter(ws: Workspace, fmt: str):  # noqa: ANN202 - one of the save_* functions, bound to the run's settings
    if fmt == "gguf":
        return partial(save_gguf, gguf_type=ws.config.export.gguf_type, name=f"{ws.config.model.source} (tyr)")
    return {"compact": save_compact, "masked": save_masked, "nemotron-nas": save_nemotron}[fmt]


def card_facts(ws: Workspace, run_id: str, fmt: str, iteration: int, layout: PrunedLayout) -> CardFacts:
    """What the model card states, read from the run's config and committed reports (figures it lacks are left out)."""
    config = ws.config
    params = layout_params(ws.model.config, layout)
    facts = CardFacts(
        fmt=fmt,
        base_model=config.model.source,
        revision=config.model.revision,
        run_id=run_id,
        config_hash=config.artefact_hash(),
        target_sparsity=config.prune.target_sparsity,
        dense_total=dense_params(ws.model.config)["total"],
        pruned_total=params["total"],
        decoder_removed_fraction=params["removed_fraction"],
        iterations=config.prune.iterations,
        generations=config.search.generations,
        offspring=config.search.offspring,
        plot=PNG_NAME if config.export.plot else None,
    )
    if is_committed(ws.store, keys.final_report_key(iteration)):
        report = read_json(ws.store, keys.final_report_key(iteration))
        base = report.get("baselines", {})
        facts.heldout = {
            name: value
            for name, value in (
                ("dense", base.get("dense_ppl")),
                ("uniform (every sublayer at the target)", base.get("uniform_ppl")),
                ("this model", report.get("tyr_ppl")),
            )
            if isinstance(value, int | float)
        }
        windows = f"{config.eval.max_windows} windows of {config.eval.seq_len} tokens"
        facts.heldout_source = f"Measured by tyr on {windows} of held-out text never used for calibration."
    return facts


@task(name="export", cache_key_fn=artefact_cache_key(lambda p: keys.export_prefix(p["fmt"])), **IO_RETRIES)
def export(ref: RunRef, iteration: int, fmt: str) -> dict:
    """Write one export format into the store under ``final/<fmt>/`` (each file committed; marker last)."""
    ws = workspace(ref)

    def produce() -> bytes:
        layout = final_layout(ws, iteration)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / fmt
            _exporter(ws, fmt)(ws.dense_model(), layout, out, tokenizer=ws.tokenizer())
            if ws.config.export.plot:
                write_sparsity_report(ws.model.config, layout, out)
            write_model_card(out, card_facts(ws, ref.run_id, fmt, iteration, layout))
            files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
            for name in files:
                commit_file(ws.store, keys.export_file_key(fmt, name), out / name, ws.config.artefact_hash())
        return canonical_json({"files": files})

    marker = commit_once(ws.store, keys.export_marker_key(fmt), produce, ws.config.artefact_hash())
    return {"format": fmt, "prefix": keys.export_prefix(fmt), "files": json.loads(marker)["files"]}
