"""The run lock: created conditionally, refreshed by a heartbeat, taken over only by a compare-and-swap on the
version read (so of racing drivers exactly one wins), and a driver that lost it stops writing. On the file store and
on S3 (moto honours ``If-Match``)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from moto.server import ThreadedMotoServer

from tyr_core import keys
from tyr_core.errors import LockLostError, RunLockedError
from tyr_core.store import FileStore, commit_bytes, read_verified
from tyr_runtime import lock as lock_module
from tyr_runtime.lock import RunLock, acquire_lock, lock_is_abandoned, release_lock
from tyr_runtime.run_status import lock_holder
from tyr_runtime.s3 import S3Store
from tyr_runtime.storage import run_store


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return FileStore(tmp_path / "runs" / "r")
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = f"lock-{time.monotonic_ns()}"
    s3 = S3Store(bucket, "runs/r", endpoint_url=endpoint, access_key="a", secret_key="b", region="us-east-1")
    s3.create_bucket()
    return s3


@pytest.fixture
def clock(monkeypatch):
    """A clock the test moves: staleness is decided by it, never by sleeping."""
    now = [1_000_000.0]
    monkeypatch.setattr(lock_module, "_now", lambda: now[0])
    return now


def other(n: int = 1) -> dict:
    """The identity of a driver on another host."""
    return {"host": f"other-host-{n}", "pid": 4242 + n, "flow_run_id": None}


def held(store) -> dict:
    return json.loads(store.get_bytes(keys.LOCK_KEY))


def test_a_live_holder_refuses_a_second_driver_and_a_stale_one_is_taken_over(store, clock):
    first = RunLock(store, "r", ttl=60, identity=other(1)).acquire()
    with pytest.raises(RunLockedError, match="being driven by another process.*other-host-1"):
        RunLock(store, "r", ttl=60, identity=other(2)).acquire()
    clock[0] += 61  # no refresh for longer than the ttl: abandoned
    assert lock_is_abandoned(held(store))
    second = RunLock(store, "r", ttl=60, identity=other(2)).acquire()
    assert held(store)["host"] == "other-host-2" and held(store)["token"] == second.body["token"]
    assert not first.refresh() and "taken over" in first.lost  # the old holder learns it at its next beat
    with pytest.raises(LockLostError):
        first.check("iter-1/plan.json")


def test_racing_takeovers_of_a_stale_lock_have_exactly_one_winner(store, clock):
    RunLock(store, "r", ttl=60, identity=other(0)).acquire()
    clock[0] += 61
    barrier, won, refused = threading.Barrier(8), [], []

    def race(n: int) -> None:
        driver = RunLock(store, "r", ttl=60, identity=other(n))
        barrier.wait()
        try:
            won.append(driver.acquire())
        except RunLockedError:
            refused.append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert held(store)["token"] == won[0].body["token"]


def test_a_refreshed_lock_outlives_its_ttl(store, clock):
    holder = RunLock(store, "r", ttl=10, identity=other(1)).acquire()
    for _ in range(5):  # 40 s of a 10 s ttl, refreshed every 8 s
        clock[0] += 8
        assert holder.refresh()
    assert not lock_is_abandoned(held(store)) and held(store)["beat"] == 5
    with pytest.raises(RunLockedError):
        RunLock(store, "r", ttl=10, identity=other(2)).acquire()
    clock[0] += 11  # and without a refresh it goes stale
    RunLock(store, "r", ttl=10, identity=other(2)).acquire()


def test_the_heartbeat_thread_refreshes_the_lock_and_release_deletes_it(store):
    holder = RunLock(store, "r", ttl=5, interval=0.01, identity=other(1)).acquire().start()
    deadline = time.monotonic() + 30
    while held(store)["beat"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held(store)["beat"] >= 3 and holder.lost is None
    holder.release()
    assert not store.exists(keys.LOCK_KEY)


def test_two_drivers_on_one_run_id_one_proceeds_and_nothing_is_overwritten(tmp_path, clock):
    """Driver A stalls past the ttl (no heartbeat), B takes the run over; A's writes are refused from then on, and
    B's commits stand."""
    base = f"file://{tmp_path}"
    a_store, b_store = run_store(base, "r"), run_store(base, "r")
    a = RunLock(a_store, "r", ttl=10, identity=other(1)).acquire()
    a_store.write_guard = a.check
    commit_bytes(a_store, "iter-1/plan.json", b"A's plan", "cfg")
    with pytest.raises(RunLockedError):
        RunLock(b_store, "r", ttl=10, identity=other(2)).acquire()  # A is live
    clock[0] += 11
    b = RunLock(b_store, "r", ttl=10, identity=other(2)).acquire()
    b_store.write_guard = b.check
    assert not a.refresh()  # A wakes up: its refresh finds B's lock
    with pytest.raises(LockLostError, match="taken over.*other-host-2"):
        commit_bytes(a_store, "iter-1/result.json", b"A's result", "cfg")
    with pytest.raises(LockLostError):
        a_store.delete("iter-1/plan.json")
    commit_bytes(b_store, "iter-1/result.json", b"B's result", "cfg")
    assert read_verified(b_store, "iter-1/plan.json") == b"A's plan"  # committed before: kept
    assert read_verified(b_store, "iter-1/result.json") == b"B's result"
    a.release()  # releases nothing: the lock is B's
    assert held(b_store)["token"] == b.body["token"]


def test_acquire_lock_guards_the_run_store_of_this_process(tmp_path):
    base = f"file://{tmp_path}"
    store = run_store(base, "g")
    holder = acquire_lock(store, "g", ttl=600)
    try:
        assert lock_holder(store)["pid"] == holder.body["pid"]  # tyr runs show: running
        store.put_bytes(keys.LOCK_KEY, json.dumps(other(3) | {"time": time.time(), "ttl": 600}).encode())
        assert not holder.refresh()
        with pytest.raises(LockLostError):
            commit_bytes(run_store(base, "g"), "x.json", b"{}", "cfg")  # any run store of this process
    finally:
        release_lock(store)
    commit_bytes(run_store(base, "g"), "x.json", b"{}", "cfg")  # released: the guard is gone
    assert held(store)["host"] == "other-host-3"  # the other holder's lock was not deleted


def test_a_lock_of_this_host_is_abandoned_only_when_its_process_is_gone():
    me = {"host": socket.gethostname(), "pid": 1, "time": 0}
    assert not lock_is_abandoned(me)  # pid 1 lives, however old the stamp
    assert lock_is_abandoned(me | {"pid": 2**22 + 1})
