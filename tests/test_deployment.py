"""End to end on real parts (loopback only): a real ``prefect server`` (the shared one), ``prefect deploy --all`` from
deployments/prefect.yaml, a process worker, and the tiny-test deployment. The worker is killed during the supernet build
and again during the search; the first run is retried by pressing Retry in the real UI served by that server
(headless Debian Chromium driven by Playwright); the second is resumed by a new flow run with the same
run id. Both finish with the uninterrupted run's result, nothing
committed is recomputed, and GC leaves only the last iteration's supernet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"  # Debian's package (scripts/install); Playwright never downloads a browser
# more copies and generations than the tiny-test recipe, so that the kills land inside the phase they target
OVERRIDES = ["prune.num_levels=9", "prune.interval=0.125", "calibration.num_windows=32", "search.generations=6"]


@pytest.fixture(scope="module")
def prefect(prefect_server, tmp_path_factory):
    """The shared server with the deployments of deployments/prefect.yaml, and the environment of this test's workers:
    a file store of their own."""
    store = tmp_path_factory.mktemp("store")
    env = {
        **prefect_server.env,
        "TYR_REPO_DIR": str(REPO),
        "TYR_STORE_URL": f"file://{store}",
        "TYR_S3_ENDPOINT_URL": "",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    deploy = ("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    deployed = prefect_server.cli(*deploy, env=env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    api = httpx.Client(base_url=prefect_server.api_url, timeout=30)
    yield {"env": env, "api": api, "store": store, "cli": [sys.executable, "-m", "prefect"]}
    api.close()


def _worker(prefect) -> subprocess.Popen:
    return subprocess.Popen(
        [*prefect["cli"], "worker", "start", "--pool", "tyr-process"],
        env=prefect["env"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _flow_run_processes() -> list[int]:
    """PIDs of flow-run processes (the process worker starts them in sessions of their own)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"PREFECT__FLOW_RUN_ID=" in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


def _kill(worker: subprocess.Popen, flow_runs: tuple[int, ...] = ()) -> None:
    """SIGKILL the worker and every flow-run process: what a dying node does to a run. ``flow_runs``, found
    beforehand, die first, without the time a search of /proc takes."""
    for pid in flow_runs:
        _kill_pid(pid)
    os.killpg(worker.pid, signal.SIGKILL)
    for pid in _flow_run_processes():
        _kill_pid(pid)
    worker.wait(timeout=30)


def _run(prefect, run_id: str, keep_last: int = 1) -> str:
    params = json.dumps({"run_id": run_id, "overrides": [*OVERRIDES, f"keep_last={keep_last}"]})
    out = subprocess.run(
        [*prefect["cli"], "deployment", "run", "tyr/tiny-test", "--params", params],
        env=prefect["env"],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return next(w for w in out.stdout.split() if w.count("-") == 4 and len(w) == 36)  # the flow run id


def _wait_for(path_glob: str, root: Path, timeout: float = 300, count: int = 1, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(root.glob(path_glob))) >= count:
            return
        time.sleep(poll)
    raise TimeoutError(path_glob)


def _state(prefect, flow_run_id: str) -> str:
    return prefect["api"].get(f"/flow_runs/{flow_run_id}").json()["state_type"]


def _wait_final(prefect, flow_run_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _state(prefect, flow_run_id)
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(1)
    raise TimeoutError(flow_run_id)


def _logs(prefect, flow_run_id: str) -> str:
    body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 20, "sort": "TIMESTAMP_DESC"}
    entries = prefect["api"].post("/logs/filter", json=body).json()
    return "\n".join(e["message"][-1500:] for e in reversed(entries))[-6000:]


def _completes(prefect, flow_run_id: str) -> None:
    state = _wait_final(prefect, flow_run_id)
    assert state == "COMPLETED", _logs(prefect, flow_run_id)


def _task_states(prefect, flow_run_id: str) -> dict[str, list[str]]:
    """Task-run states by task name, of the flow run and of its iteration subflows (where local-prune runs)."""
    api = prefect["api"]
    children = api.post("/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}}).json()
    runs = [flow_run_id, *(child["id"] for child in children)]
    states: dict[str, list[str]] = {}
    offset = 0
    while True:  # a run has hundreds of task runs; the API pages them
        body = {"flow_runs": {"id": {"any_": runs}}, "sort": "EXPECTED_START_TIME_ASC", "offset": offset, "limit": 200}
        page = api.post("/task_runs/filter", json=body).json()
        for tr in page:
            states.setdefault(tr["name"].rsplit("-", 1)[0], []).append(tr["state_name"])
        if len(page) < 200:
            return states
        offset += len(page)


def _press_retry_in_ui(prefect, flow_run_id: str) -> None:
    """Open the run in the real UI served by the server, press Retry and confirm (headless Debian Chromium)."""
    from playwright.sync_api import sync_playwright

    base = prefect["env"]["PREFECT_API_URL"].removesuffix("/api")
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
    ]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page()
        page.set_default_timeout(30_000)
        page.goto(f"{base}/runs/flow-run/{flow_run_id}")
        page.get_by_role("button", name="Retry", exact=True).click()
        dialog = page.get_by_role("dialog")
        with page.expect_response(lambda r: r.url.endswith(f"/flow_runs/{flow_run_id}/set_state")) as response:
            dialog.get_by_role("button", name="Retry", exact=True).click()
        assert response.value.status == 201
        browser.close()
    state = prefect["api"].get(f"/flow_runs/{flow_run_id}").json()["state"]
    assert state["name"] in ("AwaitingRetry", "Pending", "Running"), state


def _manifests(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*.manifest.json")}


def _result(root: Path) -> dict:
    from tyr_core import keys
    from tyr_core.store import FileStore, read_json

    return read_json(FileStore(root), keys.result_key(2))


def test_killed_runs_resume_by_ui_retry_and_by_new_run_without_recomputing(prefect):
    store = prefect["store"] / "runs"
    worker = _worker(prefect)
    try:
        ref_id = _run(prefect, "uninterrupted")
        _completes(prefect, ref_id)
    finally:
        _kill(worker)
    reference = _result(store / "uninterrupted")

    # (a) killed during the supernet build, then Retry of the same flow run, as the UI does
    worker = _worker(prefect)
    flow_run = _run(prefect, "retried", keep_last=2)  # keep iteration 1 so its manifests can be compared
    # layer 1's first copy: layer 0's local-prune task (all its levels) has finished, so the Retry has a Cached task
    # result to show, and layer 1's task is cut short; the flow-run process is found first, so the kill lands at once
    _wait_for("calibration/*.manifest.json", store / "retried")
    running = _flow_run_processes()
    _wait_for("iter-1/supernet/layer-1/*/*.manifest.json", store / "retried", poll=0.005)
    _kill(worker, tuple(running))
    assert not (store / "retried" / "iter-1" / "supernet" / "index.json").exists()
    before = _manifests(store / "retried")
    api = prefect["api"]
    # a killed node's run is marked Crashed (what Prefect's zombie detection does), then Retry is pressed in the UI
    api.post(f"/flow_runs/{flow_run}/set_state", json={"state": {"type": "CRASHED"}, "force": True})
    _press_retry_in_ui(prefect, flow_run)
    worker = _worker(prefect)
    try:
        _completes(prefect, flow_run)
    finally:
        _kill(worker)
    after = _manifests(store / "retried")
    assert before and all(after[k] == v for k, v in before.items())
    states = _task_states(prefect, flow_run)
    assert states["calibrate"] == ["Completed", "Cached"] and states["teacher"] == ["Completed", "Cached"]
    assert "Cached" in states["local-prune"]  # a layer finished before the kill comes back from the cache
    assert _result(store / "retried")["levels"] == reference["levels"]

    # (b) killed during the search, then a brand-new flow run with the same run id
    worker = _worker(prefect)
    _run(prefect, "resumed", keep_last=2)
    _wait_for("iter-1/search/gen-2.json.manifest.json", store / "resumed")
    _kill(worker)
    before = _manifests(store / "resumed")
    worker = _worker(prefect)
    try:
        _completes(prefect, _run(prefect, "resumed", keep_last=2))
    finally:
        _kill(worker)
    after = _manifests(store / "resumed")
    assert before and all(after[k] == v for k, v in before.items())
    assert _result(store / "resumed")["levels"] == reference["levels"]
    # GC (keep_last=1) left the last iteration's supernet and the best iteration's (the final model's), no other
    from tyr_core import keys
    from tyr_core.store import FileStore, best_iteration

    run = FileStore(store / "uninterrupted")
    kept = {it for it in (1, 2) if any(k.endswith(".manifest.json") for k in run.list(keys.supernet_prefix(it)))}
    assert kept == {best_iteration(run, 2), 2}
