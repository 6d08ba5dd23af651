"""Orchestration costs on the tiny preset: the flow (Prefect + store commits) vs the plain core functions, the
resume cost of a run whose work is all committed, and store throughput to a real SeaweedFS.

Prints JSON lines.  python bench/orchestration.py
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="tyr-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # 20 s is short on a busy host


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def core_seconds() -> float:
    """calibrate + teacher + every iteration with plain core functions (no Prefect, no store)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.presets import resolve_config
    from tasks.assets import resolve_corpus
    from tyr_core.families import resolve_model
    from tyr_core.fitness import TeacherTopK, write_teacher_topk
    from tyr_core.layerwise import LayerwiseModel
    from tyr_core.pipeline import calibration_windows, initial_centres, run_iteration_local

    t0 = time.perf_counter()
    cfg = resolve_config("tiny-test")
    folder = resolve_model(cfg.model.source)
    tok = AutoTokenizer.from_pretrained(folder)
    cal = cfg.calibration.model_copy(update={"files": resolve_corpus(cfg.calibration.files)})
    windows = calibration_windows(cal, tok)
    dense = AutoModelForCausalLM.from_pretrained(folder).eval()
    work = Path(tempfile.mkdtemp())
    write_teacher_topk(
        lambda ids: dense(ids).logits, windows, cfg.teacher.topk, work / "t", cfg.teacher.windows_per_shard
    )
    centres = initial_centres(LayerwiseModel(folder).geometry, cfg.prune)
    for it in range(1, cfg.prune.iterations + 1):
        centres = run_iteration_local(folder, windows, TeacherTopK(work / "t"), cfg, it, centres, work).next_centres
    return time.perf_counter() - t0


def flow_seconds(store: str, run_id: str) -> float:
    from flows.tyr import tyr

    t0 = time.perf_counter()
    tyr(preset="tiny-test", run_id=run_id, store_url=store)
    return time.perf_counter() - t0


def store_throughput() -> dict:
    from tasks.seaweed import EmbeddedSeaweed
    from tasks.storage import run_store
    from tyr_core.store import commit_bytes, commit_file, fetch_verified, read_verified

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    blobs = [random.randbytes(2 << 20) for _ in range(40)]  # 80 MB of copy-sized objects
    big = Path(tempfile.mkdtemp()) / "big.bin"
    big.write_bytes(random.randbytes(20 << 20))  # + 20 MB through the multipart file path
    with EmbeddedSeaweed(Path(tempfile.mkdtemp())) as s3:
        store = run_store(s3.store_url, "bench", endpoint_url=s3.endpoint_url)
        t0 = time.perf_counter()
        for i, b in enumerate(blobs):
            commit_bytes(store, f"c/{i}.bin", b, "h")
        commit_file(store, "c/big.bin", big, "h")
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(len(blobs)):
            read_verified(store, f"c/{i}.bin")
        fetch_verified(store, "c/big.bin", big.with_suffix(".dl"))
        read_s = time.perf_counter() - t0
    mb = (sum(map(len, blobs)) + big.stat().st_size) / 1e6
    return {"mb": round(mb), "write_mb_s": round(mb / write_s, 1), "read_mb_s": round(mb / read_s, 1)}


def main() -> None:
    store = f"file://{tempfile.mkdtemp(prefix='tyr-store-')}"
    flow_seconds(store, "warmup")  # the local Prefect server, model conversion and texts are ready afterwards
    core = core_seconds()
    flow = flow_seconds(store, "measured")
    emit(metric="orchestration_overhead", core_s=round(core, 1), flow_s=round(flow, 1), ratio=round(flow / core, 2))
    emit(metric="resume_committed_run", seconds=round(flow_seconds(store, "measured"), 1))
    emit(metric="store_throughput_seaweedfs", **store_throughput())


if __name__ == "__main__":
    main()
