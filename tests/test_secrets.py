"""A real tiny run (``tyr prune``, embedded SeaweedFS, a local Prefect with results persisted) whose store
credentials hold a planted secret: the secret is nowhere in Prefect (its database: flow run parameters, logs,
artifacts; its logs read through the API), in the persisted task results, in ``tyr runs show --json`` or in what the
commands print; and no result is a pickle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_crash import REPO, private_env

SECRET = "planted/SECRET+tyr/0123456789abcdefXYZ"

_READ_PREFECT = """
import asyncio, json
from prefect.client.orchestration import get_client
async def main():
    async with get_client() as client:
        runs = await client.read_flow_runs()
        logs = await client.read_logs()
        artifacts = await client.read_artifacts()
        print(json.dumps({
            "flow_runs": [r.model_dump(mode="json") for r in runs],
            "logs": [l.model_dump(mode="json") for l in logs],
            "artifacts": [a.model_dump(mode="json") for a in artifacts],
        }))
asyncio.run(main())
"""


def _tyr(env: dict, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tyr_cli", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_a_planted_secret_never_reaches_prefect_results_or_output_and_results_are_json(tmp_path):
    env = private_env(tmp_path) | {"PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true"}
    data = Path(env["TYR_CACHE"]) / "seaweedfs"
    data.mkdir(mode=0o700)
    creds = data / "s3-credentials.json"
    creds.write_text(json.dumps({"access_key": "tyr-planted", "secret_key": SECRET}))
    creds.chmod(0o600)

    run = _tyr(env, "prune", "tiny-test", "--run-id", "s1", "--json")
    assert run.returncode == 0, run.stderr
    shown = _tyr(env, "runs", "show", "s1", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "complete"
    slow_start = env | {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}  # a busy host
    api = subprocess.run(
        [sys.executable, "-c", _READ_PREFECT], env=slow_start, capture_output=True, text=True, timeout=300
    )
    assert api.returncode == 0, api.stderr
    prefect = json.loads(api.stdout)
    assert prefect["flow_runs"] and prefect["logs"] and prefect["artifacts"]  # there is something to search

    for text in (run.stdout, run.stderr, shown.stdout, shown.stderr, api.stdout):
        assert SECRET not in text and "planted/SECRET" not in text
    home = Path(env["PREFECT_HOME"])
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".db") for p in files)  # the server's database: parameters, logs, artifacts, events
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path

    results = [p for p in (home / "storage").rglob("*") if p.is_file()]
    assert results  # the tasks' persisted results
    for path in results:
        record = json.loads(path.read_bytes())  # a pickle would not parse
        if isinstance(record, dict) and set(record) == {"metadata", "result"}:  # a task's record
            assert record["metadata"]["serializer"]["type"] == "json", path
        # else a flow's result, stored bare (its record's metadata lives in the database): JSON as parsed
        assert not path.read_bytes().startswith(b"\x80")
    assert os.stat(creds).st_mode & 0o077 == 0
