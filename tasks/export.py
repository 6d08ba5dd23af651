"""The export step: the searched model written in one format into the store, every file committed, its file list
last."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task

from tyr_core import keys
from tyr_core.export import save_compact, save_masked, save_nemotron, write_sparsity_report
from tyr_core.store import commit_bytes, commit_file, is_committed, read_json
from tyr_runtime.workspace import RunRef, dumps, workspace

from .evaluate import final_layout
from .policies import IO_RETRIES, artefact_cache_key

EXPORTERS = {"compact": save_compact, "masked": save_masked, "nemotron-nas": save_nemotron}


@task(name="export", cache_key_fn=artefact_cache_key(lambda p: keys.export_prefix(p["fmt"])), **IO_RETRIES)
def export(ref: RunRef, iteration: int, fmt: str) -> dict:
    """Write one export format into the store under ``final/<fmt>/`` (each file committed; marker last)."""
    ws = workspace(ref)
    marker = keys.export_marker_key(fmt)
    if not is_committed(ws.store, marker):
        layout = final_layout(ws, iteration)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / fmt
            EXPORTERS[fmt](ws.dense_model(), layout, out, tokenizer=ws.tokenizer())
            if ws.config.export.plot:
                write_sparsity_report(ws.model.config, layout, out)
            files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
            for name in files:
                commit_file(ws.store, keys.export_file_key(fmt, name), out / name, ws.config.artefact_hash())
        commit_bytes(ws.store, marker, dumps({"files": files}), ws.config.artefact_hash())
    return {"format": fmt, "prefix": keys.export_prefix(fmt), "files": read_json(ws.store, marker)["files"]}
