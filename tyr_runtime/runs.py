"""Opening a run: where it lives, its saved config (a resume with another config is refused), and its lock
(``lock.py``); releasing it when the run ends in this process."""

from __future__ import annotations

import json
import os
import re
import uuid

from tyr_core import keys
from tyr_core.config import RunConfig
from tyr_core.errors import IncompatibleRunError
from tyr_core.families import default_cache_dir
from tyr_core.store import Store, commit_bytes, is_committed, read_json

from . import ray_engine
from .lock import acquire_lock, release_lock
from .safety import refuse_caller_parameters, refuse_dangerous_settings
from .storage import check_store, run_store
from .workspace import RunRef, forget


def default_store_url() -> str:
    """``TYR_STORE_URL`` if set, else a file store in the user's cache."""
    return os.environ.get("TYR_STORE_URL") or f"file://{default_cache_dir() / 'store'}"


def default_run_id(config: RunConfig) -> str:
    """Re-running the same command resumes the same run: the id is derived from the artefact hash."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", config.model.source.rsplit("/", 1)[-1])[:40].strip("-")
    return f"{stem}-{config.artefact_hash()[:10]}"


def open_run(config: RunConfig, run_id: str | None, store_url: str | None, endpoint_url: str | None) -> RunRef:
    """Create the run (commit ``run.json``) or check that a resumed run has the same config; take its lock."""
    refuse_dangerous_settings(config)  # before anything is written
    refuse_caller_parameters(store_url=store_url, endpoint_url=endpoint_url)
    endpoint_url = endpoint_url or os.environ.get("TYR_S3_ENDPOINT_URL")
    ref = RunRef(
        run_id=run_id or default_run_id(config), store_url=store_url or default_store_url(), endpoint_url=endpoint_url
    )
    store = run_store(ref.store_url, ref.run_id, endpoint_url=ref.endpoint_url)
    check_store(store)  # unreachable endpoint, rejected credentials, missing bucket: fail before any work
    acquire_lock(store, ref.run_id)  # first: of two simultaneous first starts, one drives and one is refused
    try:
        _check_or_commit_config(store, config, ref.run_id)
    except BaseException:
        release_lock(store)
        raise
    forget(ref)  # a fresh workspace reads the committed config
    ray_engine.request(ref, config.execution, config.torch_threads)  # this invocation's, not run.json's
    return ref


def _check_or_commit_config(store: Store, config: RunConfig, run_id: str) -> None:
    if is_committed(store, keys.RUN_CONFIG):
        saved = read_json(store, keys.RUN_CONFIG)
        if saved["artefact_hash"] != config.artefact_hash():
            raise IncompatibleRunError(
                f"run {run_id!r} was started with another configuration (artefact hash {saved['artefact_hash']}, "
                f"now {config.artefact_hash()}); resume it with its saved run.json, or choose a new --run-id"
            )
        return
    body = {
        "run_id": run_id,
        "config": config.model_dump(mode="json"),
        "artefact_hash": config.artefact_hash(),
        # names this incarnation of the run: task cache keys include it, so a run deleted and redone under the same
        # id never gets Prefect results cached for the old one (whose artefacts are gone)
        "incarnation": uuid.uuid4().hex,
    }
    commit_bytes(store, keys.RUN_CONFIG, json.dumps(body, indent=1, sort_keys=True).encode(), config.artefact_hash())


def release_run(ref: RunRef) -> None:
    """The run is over in this process: its lock is released, and its workspace (models, search cache, activations)
    with it, so that a process that drives several runs (a notebook, the bench, the tests) does not keep each one's;
    its Ray actors too (``execution.engine=ray``)."""
    forget(ref)
    ray_engine.release(ref)
    release_lock(run_store(ref.store_url, ref.run_id, endpoint_url=ref.endpoint_url))
