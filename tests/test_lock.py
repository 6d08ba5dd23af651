"""The run lock: created conditionally, refreshed by a heartbeat, taken over only by a compare-and-swap on the
version read (so of racing drivers exactly one wins), and a driver that lost it stops writing. On the file store and
on S3 (moto honours ``If-Match``)."""

from __future__ import annotations

import json
import logging
import os
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


class Clock:
    """The lock's clocks, moved by the test: ``wall`` (the stamp in the lock) and ``mono`` (this process's monotonic
    clock); a taker's sleep moves both and runs ``during_sleep`` (what other drivers do meanwhile)."""

    def __init__(self) -> None:
        self.wall, self.mono = 1_000_000.0, 50.0
        self.during_sleep: list = []

    def __iadd__(self, seconds: float) -> Clock:
        self.wall += seconds
        self.mono += seconds
        return self

    def sleep(self, seconds: float) -> None:
        self += seconds
        for hook in self.during_sleep:
            hook()


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """Staleness is decided by the test's clocks, never by sleeping."""
    c = Clock()
    monkeypatch.setattr(lock_module, "_now", lambda: c.wall)
    monkeypatch.setattr(lock_module, "_monotonic", lambda: c.mono)
    monkeypatch.setattr(lock_module, "_sleep", c.sleep)
    return c


def other(n: int = 1) -> dict:
    """The identity of a driver on another host."""
    return {"host": f"other-host-{n}", "pid": 4242 + n, "flow_run_id": None}


def held(store) -> dict:
    return json.loads(store.get_bytes(keys.LOCK_KEY))


def test_a_live_holder_refuses_a_second_driver_and_a_stale_one_is_taken_over(store, clock):
    first = RunLock(store, "r", ttl=60, identity=other(1)).acquire()
    with pytest.raises(RunLockedError, match="being driven by another process.*other-host-1"):
        RunLock(store, "r", ttl=60, identity=other(2)).acquire()
    clock += 61  # no refresh for longer than the ttl: it looks abandoned, and stays unchanged while watched
    assert lock_is_abandoned(held(store))
    second = RunLock(store, "r", ttl=60, identity=other(2)).acquire()
    assert held(store)["host"] == "other-host-2" and held(store)["token"] == second.body["token"]
    assert not first.refresh() and "taken over" in first.lost  # the old holder learns it at its next beat
    with pytest.raises(LockLostError):
        first.check("iter-1/plan.json")


def test_racing_takeovers_of_a_stale_lock_have_exactly_one_winner(store, clock):
    RunLock(store, "r", ttl=60, identity=other(0)).acquire()
    clock += 61
    barrier, won, refused = threading.Barrier(8), [], []
    beating = threading.Lock()

    def winner_beats() -> None:  # the winner's heartbeat, while the others still watch
        with beating:
            for lock in won:
                lock.refresh()

    clock.during_sleep.append(winner_beats)

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
        clock += 8
        assert holder.refresh()
    assert not lock_is_abandoned(held(store)) and held(store)["beat"] == 5
    with pytest.raises(RunLockedError):
        RunLock(store, "r", ttl=10, identity=other(2)).acquire()
    clock += 11  # and without a refresh it goes stale
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
    clock += 11
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


def test_a_stalled_holder_stops_writing_before_a_taker_may_take_its_lock(tmp_path, clock):
    """The holder fences itself at ttl less two beats after its last successful refresh; a taker on another host
    waits a whole ttl, so the stalled holder's write lands neither after the takeover nor beside it."""
    base = f"file://{tmp_path}"
    a_store, b_store = run_store(base, "r"), run_store(base, "r")
    a = RunLock(a_store, "r", ttl=10, identity=other(1)).acquire()
    a_store.write_guard = a.check
    clock += 7.9  # fence: 10 - 2 x 1 s
    commit_bytes(a_store, "iter-1/plan.json", b"A's plan", "cfg")
    clock += 0.2  # stalled past its fence (no beat landed): refused before anyone took over
    with pytest.raises(LockLostError, match="last refreshed 8 s ago, past its 8 s fence"):
        commit_bytes(a_store, "iter-1/result.json", b"A's result", "cfg")
    clock += 3
    b = RunLock(b_store, "r", ttl=10, identity=other(2)).acquire()
    assert held(b_store)["token"] == b.body["token"]
    with pytest.raises(LockLostError):
        a_store.put_bytes("iter-1/written-after-takeover.txt", b"A")
    assert not b_store.exists("iter-1/written-after-takeover.txt")


def test_a_taker_whose_clock_runs_ahead_does_not_take_a_live_lock(store, clock):
    holder = RunLock(store, "r", ttl=10, identity=other(1)).acquire()
    clock.during_sleep.append(holder.refresh)  # the holder keeps beating while the taker watches
    clock.wall += 3600  # the taker's host clock is an hour ahead: the lock's stamp looks stale
    with pytest.raises(RunLockedError, match="heartbeat moved while this process watched it"):
        RunLock(store, "r", ttl=10, identity=other(2)).acquire()
    assert held(store)["token"] == holder.body["token"] and holder.refresh()


def test_a_stale_looking_lock_is_taken_over_only_after_a_ttl_of_the_takers_own_clock(store, clock):
    RunLock(store, "r", ttl=10, identity=other(1)).acquire()  # its host died
    clock.wall += 3600  # stamped an hour ago by this host's clock
    start = clock.mono
    taker = RunLock(store, "r", ttl=10, identity=other(2)).acquire()
    assert clock.mono - start >= 10 and held(store)["token"] == taker.body["token"]


def test_a_lock_of_this_host_naming_a_recycled_pid_is_taken_over():
    """A container restarted under the same hostname: its old lock names pid 1, now another process."""
    me = {"host": socket.gethostname(), "pid": 1, "time": 0}
    assert lock_is_abandoned(me | {"started_at": "another-boot:12345"})
    assert not lock_is_abandoned(me | {"started_at": lock_module.process_start(1)})
    assert lock_module.process_start(os.getpid()) == lock_module._holder(60)["started_at"]


def test_a_recycled_pid_lock_is_taken_over_on_a_real_store(tmp_path):
    store = run_store(f"file://{tmp_path}", "r")
    stale = {"host": socket.gethostname(), "pid": 1, "started_at": "another-boot:1", "time": 0, "ttl": 600}
    store.put_bytes(keys.LOCK_KEY, json.dumps(stale | {"token": "old", "beat": 0}).encode())
    taker = RunLock(store, "r").acquire()
    assert held(store)["token"] == taker.body["token"]


def test_a_process_working_for_a_driver_stops_writing_once_the_driver_lost_the_lock(tmp_path, clock):
    """A Ray replica's store checks the driver's token in the lock before each write."""
    base = f"file://{tmp_path}"
    driver = RunLock(run_store(base, "w"), "w", ttl=10, identity=other(1)).acquire()
    replica_store = run_store(base, "w")
    lock_module.work_for(replica_store.url, driver.body["token"])
    try:
        commit_bytes(replica_store, "iter-1/supernet/a.bin", b"copy", "cfg")
        clock += 11
        RunLock(run_store(base, "w"), "w", ttl=10, identity=other(2)).acquire()  # the driver's host died
        with pytest.raises(LockLostError, match="no longer holds the lock.*other-host-2"):
            commit_bytes(replica_store, "iter-1/supernet/b.bin", b"copy", "cfg")
    finally:
        lock_module._WORKING_FOR.pop(replica_store.url, None)


FIRST_START = """
import os, sys, time
from pathlib import Path
from flows.recipes import resolve_config
from tyr_runtime.runs import open_run, release_run

store_url, meet, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
config = resolve_config("tiny-test")


def wait_for(prefix, count):
    deadline = time.monotonic() + 120
    while len(list(meet.glob(prefix + "*"))) < count and time.monotonic() < deadline:
        time.sleep(0.01)


(meet / f"ready-{os.getpid()}").touch()
wait_for("ready-", n)  # all start together
try:
    ref = open_run(config, "same", store_url, None)
except Exception as err:
    (meet / f"tried-{os.getpid()}").touch()
    print(type(err).__name__, err)
else:
    wait_for("tried-", n - 1)  # still driving while every other one tries
    release_run(ref)
    print("drives")
"""


def test_simultaneous_first_starts_of_one_run_id_one_drives_and_the_others_are_refused(tmp_path):
    """Three processes start the same new run at the same instant: the lock is taken before run.json is committed,
    so exactly one drives and each other one is told who does, never that run.json was committed with other bytes."""
    import subprocess
    import sys

    meet = tmp_path / "meet"
    meet.mkdir()
    command = [sys.executable, "-c", FIRST_START, f"file://{tmp_path}", str(meet), "3"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outcomes = sorted(p.communicate(timeout=300)[0].strip() for p in procs)
    assert outcomes[0].startswith("RunLockedError") and outcomes[1].startswith("RunLockedError"), outcomes
    assert outcomes[2] == "drives" and "being driven by another process" in outcomes[0], outcomes
