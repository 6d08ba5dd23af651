"""The data steps: calibration windows and the dense teacher's top-k logits, each committed once per run."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from prefect import task
from safetensors.torch import save

from tyr_core import keys
from tyr_core.fitness import write_teacher_topk
from tyr_core.pipeline import calibration_split
from tyr_core.store import commit_file, commit_once
from tyr_runtime.real_assets import resolve_corpus
from tyr_runtime.workspace import RunRef, Workspace, workspace

from .policies import IO_RETRIES, artefact_cache_key


@task(name="calibrate", cache_key_fn=artefact_cache_key(lambda p: keys.calibration_key()), **IO_RETRIES)
def calibrate(ref: RunRef) -> dict:
    """Calibration windows, the search's validation windows (if any) and held-out windows, tokenised once and
    committed."""
    ws = workspace(ref)
    split: list[tuple[torch.Tensor, torch.Tensor]] = []  # tokenised once, only if something is missing

    def calibration_part(index: int) -> torch.Tensor:
        if not split:
            split.append(_calibration_split(ws))
        return split[0][index]

    parts = {"tokens": partial(calibration_part, 0), "heldout": partial(_heldout, ws)}
    if ws.config.calibration.validation_windows:
        parts["validation"] = partial(calibration_part, 1)
    for name, windows in parts.items():
        commit_once(ws.store, keys.calibration_key(name), partial(_safetensors, windows), ws.config.artefact_hash())
    return {"key": keys.calibration_key(), "windows": list(ws.calibration().shape)}


def _safetensors(windows: Callable[[], torch.Tensor]) -> bytes:
    return save({"windows": windows().contiguous()})  # the bytes ``save_file`` writes


def _calibration_split(ws: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = ws.config.calibration
    return calibration_split(cfg.model_copy(update={"files": resolve_corpus(cfg.files)}), ws.tokenizer())


def _heldout(ws: Workspace) -> torch.Tensor:
    from tyr_core.calibration import heldout_windows, iter_pieces

    ev = ws.config.eval
    pieces = iter_pieces(resolve_corpus(ev.files), ev.dataset, ev.dataset_config, ev.split, ev.text_field)
    return heldout_windows(ws.tokenizer(), pieces, ev.seq_len, ev.max_windows)


@task(name="teacher", cache_key_fn=artefact_cache_key(lambda p: keys.teacher_index_key()), **IO_RETRIES)
def teacher(ref: RunRef) -> dict:
    """The dense model's top-k logits on every window the search scores (fp16 values, int32 ids), in shards, with
    the outputs of ``search.hidden_layers`` when the fitness's hidden-state term is on; taken on the run's device."""
    ws = workspace(ref)

    def produce() -> bytes:
        logits, captured = ws.teacher_forward()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            write_teacher_topk(
                logits,
                ws.search_windows()[: ws.config.teacher.max_windows],  # None: all of them
                ws.config.teacher.topk,
                out,
                ws.config.teacher.windows_per_shard,
                captured=captured,
                hidden_layers=ws.hidden_layers(),
            )
            for shard in sorted(out.glob("*.safetensors")):
                commit_file(ws.store, keys.teacher_file_key(shard.name), shard, ws.config.artefact_hash())
            return (out / "index.json").read_bytes()

    return json.loads(commit_once(ws.store, keys.teacher_index_key(), produce, ws.config.artefact_hash()))
