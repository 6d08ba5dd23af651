"""The data steps: calibration windows and the dense teacher's top-k logits, each committed once per run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from prefect import task
from safetensors.torch import save_file

from tyr_core import keys
from tyr_core.fitness import write_teacher_topk
from tyr_core.pipeline import calibration_split
from tyr_core.store import commit_file, is_committed, read_json
from tyr_runtime.real_assets import resolve_corpus
from tyr_runtime.workspace import RunRef, workspace

from .policies import IO_RETRIES, artefact_cache_key


@task(name="calibrate", cache_key_fn=artefact_cache_key(lambda p: keys.calibration_key()), **IO_RETRIES)
def calibrate(ref: RunRef) -> dict:
    """Calibration windows, the search's validation windows (if any) and held-out windows, tokenised once and
    committed."""
    ws = workspace(ref)
    split: list[tuple[torch.Tensor, torch.Tensor]] = []  # tokenised once, only if something is missing

    def part(index: int):
        def make(ws) -> torch.Tensor:
            if not split:
                split.append(_calibration_split(ws))
            return split[0][index]

        return make

    parts = [("tokens", part(0)), ("heldout", _heldout)]
    if ws.config.calibration.validation_windows:
        parts.append(("validation", part(1)))
    for name, make in parts:
        key = keys.calibration_key(name)
        if not is_committed(ws.store, key):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "w.safetensors"
                save_file({"windows": make(ws).contiguous()}, str(path))
                commit_file(ws.store, key, path, ws.config.artefact_hash())
    return {"key": keys.calibration_key(), "windows": list(ws.calibration().shape)}


def _calibration_split(ws) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = ws.config.calibration
    return calibration_split(cfg.model_copy(update={"files": resolve_corpus(cfg.files)}), ws.tokenizer())


def _heldout(ws) -> torch.Tensor:
    from tyr_core.calibration import eval_windows, load_documents

    ev = ws.config.eval
    docs = load_documents(resolve_corpus(ev.files), ev.dataset, ev.dataset_config, ev.split, ev.text_field)
    return eval_windows(ws.tokenizer(), docs, ev.seq_len)[: ev.max_windows]


@task(name="teacher", cache_key_fn=artefact_cache_key(lambda p: keys.teacher_index_key()), **IO_RETRIES)
def teacher(ref: RunRef) -> dict:
    """The dense model's top-k logits on every window the search scores (fp16 values, int32 ids), in shards; the
    top-k is taken on the run's device."""
    ws = workspace(ref)
    if is_committed(ws.store, keys.teacher_index_key()):
        return read_json(ws.store, keys.teacher_index_key())
    _, logits = ws.forward_model()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        index = write_teacher_topk(
            logits,
            ws.search_windows()[: ws.config.teacher.max_windows],  # None: all of them
            ws.config.teacher.topk,
            out,
            ws.config.teacher.windows_per_shard,
        )
        for shard in sorted(out.glob("*.safetensors")):
            commit_file(ws.store, keys.teacher_file_key(shard.name), shard, ws.config.artefact_hash())
        commit_file(ws.store, keys.teacher_index_key(), out / "index.json", ws.config.artefact_hash())
    return read_json(ws.store, keys.teacher_index_key()) if index is not None else {}
