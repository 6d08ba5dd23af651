"""The export step: the searched model written in one format into the store, every file committed, its file list
last."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import task

from tyr_core import keys
from tyr_core.export import save_compact, save_masked, save_nemotron, write_sparsity_report
from tyr_core.store import canonical_json, commit_file, commit_once
from tyr_runtime.workspace import RunRef, workspace

from .evaluate import final_layout
from .policies import IO_RETRIES, artefact_cache_key

EXPORTERS = {"compact": save_compact, "masked": save_masked, "nemotron-nas": save_nemotron}


@task(name="export", cache_key_fn=artefact_cache_key(lambda p: keys.export_prefix(p["fmt"])), **IO_RETRIES)
def export(ref: RunRef, iteration: int, fmt: str) -> dict:
    """Write one export format into the store under ``final/<fmt>/`` (each file committed; marker last)."""
    ws = workspace(ref)

    def produce() -> bytes:
        layout = final_layout(ws, iteration)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / fmt
            EXPORTERS[fmt](ws.dense_model(), layout, out, tokenizer=ws.tokenizer())
            if ws.config.export.plot:
                write_sparsity_report(ws.model.config, layout, out)
            files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
            for name in files:
                commit_file(ws.store, keys.export_file_key(fmt, name), out / name, ws.config.artefact_hash())
        return canonical_json({"files": files})

    marker = commit_once(ws.store, keys.export_marker_key(fmt), produce, ws.config.artefact_hash())
    return {"format": fmt, "prefix": keys.export_prefix(fmt), "files": json.loads(marker)["files"]}
