"""A ``tyr prune`` killed with SIGKILL (its whole process group: the CLI, its local Prefect server, its embedded
SeaweedFS) resumes with the same command and ends with the artefacts of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tyr_core import keys
from tyr_runtime.seaweed import EmbeddedSeaweed

REPO = Path(__file__).resolve().parents[1]


def private_env(root: Path) -> dict[str, str]:
    """A private TYR_CACHE (its own embedded store) and PREFECT_HOME, sharing the real model and text caches."""
    real = Path(os.environ.get("TYR_CACHE", Path.home() / ".cache" / "tyr"))
    cache = root / "cache"
    cache.mkdir(parents=True)
    for shared in ("models", "data"):
        (real / shared).mkdir(parents=True, exist_ok=True)
        (cache / shared).symlink_to(real / shared)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "TYR_STORE_URL", "TYR_S3_ENDPOINT_URL")}
    return env | {"TYR_CACHE": str(cache), "PREFECT_HOME": str(root / "prefect")}


def prune(env: dict[str, str], run_id: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tyr_cli", "prune", "tiny-test", "--run-id", run_id, "--json"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as `setsid` gives it
    )


def committed(data_dir: Path, run_id: str) -> dict[str, str]:
    """{key: sha256} of every committed artefact of the run but ``run.json`` (which names its incarnation)."""
    with EmbeddedSeaweed(data_dir) as server:
        store = server.open_store(keys.run_prefix(run_id))
        found = {}
        for key in store.list(""):
            if keys.is_manifest(key) and keys.manifest_target(key) != keys.RUN_CONFIG:
                manifest = json.loads(store.get_bytes(key))
                found[manifest["key"]] = manifest["sha256"]
        return found


@pytest.mark.slow
def test_a_run_killed_with_its_process_group_resumes_to_the_uninterrupted_artefacts(tmp_path):
    clean_env, killed_env = private_env(tmp_path / "clean"), private_env(tmp_path / "killed")
    clean = prune(clean_env, "R", tmp_path)
    out, err = clean.communicate(timeout=900)
    assert clean.returncode == 0, err
    expected = committed(Path(clean_env["TYR_CACHE"]) / "seaweedfs", "R")

    victim = prune(killed_env, "R", tmp_path)
    data = Path(killed_env["TYR_CACHE"]) / "seaweedfs"
    deadline = time.monotonic() + 120
    while not (data / "tyr-weed.pid.json").exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(6)  # into the run: Prefect's server is up and the first tasks are committing
    os.killpg(victim.pid, signal.SIGKILL)  # the whole group, as `kill -9 -- -PGID` does
    victim.communicate()

    resumed = prune(killed_env, "R", tmp_path)
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err
    assert "Traceback" not in err and json.loads(out)["run_id"] == "R"
    assert committed(data, "R") == expected
