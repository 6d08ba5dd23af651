"""The run's lock: ``lock.json`` names the live process that drives the run, so that two processes never drive one
run id at once.

It is created conditionally (``put_if_absent``) and, while the run lives, refreshed by a heartbeat thread every
``ttl / 10`` seconds with a compare-and-swap (``replace_if``: S3 ``If-Match`` on the ETag, a locked compare on the
file store). A lock whose holder is gone is taken over with the same compare-and-swap on the version that was read,
never by a delete then a create, so of two drivers racing for it exactly one wins.

Whether the holder is gone is never decided on two hosts' wall clocks:
- on this host, its process is gone, or its pid now names a process started at another time (a recycled pid);
- on another host, the lock's (version, beat) stayed unchanged for ``ttl`` seconds of the taker's own monotonic
  clock. The lock's wall-clock stamp only lets a taker refuse a fresh-looking lock without waiting.

The holder fences itself: once its last successful refresh is older than ``ttl`` less two beats, or a refresh finds
the lock changed, every write of the run's store in that process raises ``LockLostError`` (``run_store`` installs
the guard), so a stalled holder never writes beside the driver that took over. Processes that work for a driver
(Ray replicas) check the lock's token before each write.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tyr_core import keys
from tyr_core.errors import LockLostError, MissingArtefactError, RunLockedError, StoreError
from tyr_core.store import Store

from .seaweed_host import started_at

# a lock not refreshed for this long is abandoned (its holder, on another host, died); TYR_LOCK_TTL_S overrides it
LOCK_TTL_S = float(os.environ.get("TYR_LOCK_TTL_S", "600"))

_HELD: dict[str, RunLock] = {}  # the locks this process holds, by the run store's URL
_WORKING_FOR: dict[str, str] = {}  # run store URL -> the lock token of the driver this process works for
_HELD_GUARD = threading.Lock()
_MAX_TTL_S = 86_400.0  # a lock that claims a longer ttl is believed for this long at most

log = logging.getLogger(__name__)


def _now() -> float:
    return time.time()


def _monotonic() -> float:
    return time.monotonic()


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def process_start(pid: int) -> str | None:
    """The boot and the start time of process ``pid`` (Linux ``/proc``), which a recycled pid does not share; None
    where they cannot be read."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    started = started_at(pid)
    return None if started is None else f"{boot}:{started}"


def _holder(ttl: float, identity: dict | None = None) -> dict:
    try:
        from prefect.runtime import flow_run

        flow_run_id = flow_run.id
    except Exception:  # outside a flow run
        flow_run_id = None
    pid = os.getpid()
    me = {"host": socket.gethostname(), "pid": pid, "started_at": process_start(pid), "flow_run_id": flow_run_id}
    return me | (identity or {}) | {"time": _now(), "ttl": ttl, "token": uuid.uuid4().hex, "beat": 0}


def _lock_ttl(lock: dict) -> float:
    try:
        ttl = float(lock.get("ttl", LOCK_TTL_S))
    except (TypeError, ValueError):
        return LOCK_TTL_S
    return min(ttl, _MAX_TTL_S) if ttl > 0 else LOCK_TTL_S


def _holder_process_is_gone(lock: dict) -> bool:
    """A lock of this host: its process is dead, or its pid now belongs to a process started at another time."""
    try:
        pid = int(lock["pid"])
        os.kill(pid, 0)
    except (ProcessLookupError, KeyError, ValueError, TypeError, OverflowError):  # gone, or names no process
        return True
    except PermissionError:  # alive, another user's
        pass
    recorded, now = lock.get("started_at"), process_start(pid)
    return recorded is not None and now is not None and recorded != now


def lock_is_abandoned(lock: dict) -> bool:
    """The lock's holder looks gone (for status reports): on this host its process is gone; on another, its last
    refresh is older than its ttl by this host's clock. Taking a lock over asks more (``RunLock.acquire``)."""
    if lock.get("host") == socket.gethostname():
        return _holder_process_is_gone(lock)
    return _looks_stale(lock)


def _looks_stale(lock: dict) -> bool:
    try:
        return _now() - float(lock.get("time", 0)) > _lock_ttl(lock)
    except (TypeError, ValueError):
        return True


class RunLock:
    """One process's hold on one run's lock. ``acquire`` then ``start`` (the heartbeat), ``release`` at the end.

    Args:
        store: the run's store (a ``SwapStore``).
        run_id: for messages.
        ttl: seconds without a refresh after which another host may take the lock over.
        interval: seconds between refreshes (default ``ttl / 10``).
        identity: overrides of host, pid, flow_run_id (tests stand for other drivers with it).
    """

    def __init__(
        self,
        store: Store,
        run_id: str,
        ttl: float | None = None,
        interval: float | None = None,
        identity: dict | None = None,
    ):
        self.store, self.run_id = store, run_id
        self.ttl = float(ttl or LOCK_TTL_S)
        self.interval = float(interval or self.ttl / 10)
        if not 0 < self.interval <= self.ttl / 4:
            raise ValueError(f"lock interval {self.interval:g} s must be positive and at most a quarter of ttl")
        self.body = _holder(self.ttl, identity)
        self.tag: str | None = None
        self.lost: str | None = None
        self._last_ok = _monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ taking it

    def _is_mine(self, lock: dict) -> bool:
        """A lock this driver may simply replace: its own flow run's (a retried flow run) or its own process's."""
        me = self.body
        same_flow_run = me["flow_run_id"] is not None and lock.get("flow_run_id") == me["flow_run_id"]
        return same_flow_run or (lock.get("host"), lock.get("pid")) == (me["host"], me["pid"])

    def _refuse(self, lock: dict, why: str) -> RunLockedError:
        return RunLockedError(
            f"run {self.run_id!r} is being driven by another process (host {lock.get('host')}, pid {lock.get('pid')}, "
            f"flow run {lock.get('flow_run_id')}; {why}); wait for it to finish or cancel it first"
        )

    def _check_abandoned(self, lock: dict, tag: str) -> None:
        """Return once the holder of ``lock`` (read at version ``tag``) is gone; raise RunLockedError if it lives.

        On this host the holder's process decides. On another host a lock whose stamp looks fresh is refused at
        once; one that looks stale is watched for the holder's ttl on this process's monotonic clock, and refused
        if its version or beat moves (a live holder whose clock runs behind this host's)."""
        if lock.get("host") == socket.gethostname():
            if not _holder_process_is_gone(lock):
                raise self._refuse(lock, "its process is alive on this host")
            return
        ttl = _lock_ttl(lock)
        if not _looks_stale(lock):
            raise self._refuse(lock, f"its heartbeat is younger than its ttl of {ttl:g} s")
        seen = (tag, lock.get("beat"))
        log.warning(
            "run %r: the lock of host %s, pid %s looks abandoned; taking it over if its heartbeat does not move "
            "within %g s (its ttl)",
            self.run_id,
            lock.get("host"),
            lock.get("pid"),
            ttl,
        )
        start = _monotonic()
        poll = max(min(ttl / 20, 5.0), 0.01)
        while _monotonic() - start < ttl:
            _sleep(poll)
            try:
                current, now_tag = self.store.get_tagged(keys.LOCK_KEY)
            except MissingArtefactError:  # released meanwhile: the holder finished
                return
            if (now_tag, _parse(current).get("beat")) != seen:
                raise self._refuse(_parse(current), "its heartbeat moved while this process watched it")

    def acquire(self) -> RunLock:
        """Take the lock: create it, or take over an abandoned one (compare-and-swap on the version read).

        Raises:
            RunLockedError: a live holder (another process, another flow run) has it.
        """
        for _ in range(5):
            self.body["time"] = _now()  # stamped when taken, not when this object was made
            data = json.dumps(self.body).encode()
            attempt = _monotonic()
            if self.store.put_if_absent(keys.LOCK_KEY, data):
                if self._reread_is_mine():
                    self._last_ok = attempt
                    return self
                continue
            try:
                current, tag = self.store.get_tagged(keys.LOCK_KEY)
            except MissingArtefactError:  # released between our create and our read
                continue
            lock = _parse(current)
            if lock.get("token") == self.body["token"]:  # our create landed although its answer was lost
                self.tag = tag
                self._last_ok = attempt
                return self
            if not self._is_mine(lock):
                self._check_abandoned(lock, tag)
            attempt = _monotonic()
            new_tag = self.store.replace_if(keys.LOCK_KEY, data, tag)
            if new_tag is not None or self._reread_is_mine():
                self.tag = new_tag or self.tag
                self._last_ok = attempt
                return self
        raise RunLockedError(f"could not take the lock of run {self.run_id!r}; try again")

    def _reread_is_mine(self) -> bool:
        try:
            current, tag = self.store.get_tagged(keys.LOCK_KEY)
        except MissingArtefactError:
            return False
        if _parse(current).get("token") == self.body["token"] and _parse(current).get("beat") == self.body["beat"]:
            self.tag = tag
            return True
        return False

    # ------------------------------------------------------------------------------------------------ keeping it

    def refresh(self) -> bool:
        """Stamp the lock with the time now (compare-and-swap on the version we wrote last); False once lost.

        A store error is retried at the next beat; once refreshes have failed for longer than ``ttl`` less one
        interval, another host may have taken the lock over, so it counts as lost.
        """
        if self.lost:
            return False
        previous = dict(self.body)
        self.body = self.body | {"time": _now(), "beat": self.body["beat"] + 1}
        attempt = _monotonic()  # a refresh counts from when it was sent, never from its (late) answer
        try:
            new_tag = self.store.replace_if(keys.LOCK_KEY, json.dumps(self.body).encode(), str(self.tag))
            if new_tag is None and not self._reread_is_mine():  # a lost answer to a write that landed is still ours
                holder = self._current_holder()
                self.lost = f"the lock of run {self.run_id!r} was taken over ({holder})"
                return False
        except StoreError as err:
            self.body = previous
            if _monotonic() - self._last_ok > self.ttl - self.interval:
                self.lost = f"the lock of run {self.run_id!r} could not be refreshed for {self.ttl:g} s ({err})"
                return False
            return True
        self.tag = new_tag or self.tag
        self._last_ok = attempt
        return True

    def _current_holder(self) -> str:
        try:
            lock = _parse(self.store.get_bytes(keys.LOCK_KEY))
        except Exception:  # gone or unreadable
            return "it is gone"
        return f"now host {lock.get('host')}, pid {lock.get('pid')}, flow run {lock.get('flow_run_id')}"

    def start(self) -> RunLock:
        """Start the heartbeat thread (a daemon: it never keeps a process alive)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name=f"tyr-lock-{self.run_id}", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.refresh():
                return

    @property
    def fence_s(self) -> float:
        """Seconds after its last successful refresh at which the holder stops writing: a taker waits ``ttl``."""
        return self.ttl - 2 * self.interval

    def check(self, key: str | None = None) -> None:
        """Raise ``LockLostError`` if the lock was lost or its last successful refresh is older than ``fence_s``
        (the lock's own key is exempt: releasing it is fine)."""
        if key == keys.LOCK_KEY:
            return
        age = _monotonic() - self._last_ok
        if not self.lost and age > self.fence_s:
            self.lost = (
                f"the lock of run {self.run_id!r} was last refreshed {age:.0f} s ago, past its {self.fence_s:g} s "
                "fence (a stalled process, or a store it cannot reach)"
            )
        if self.lost:
            raise LockLostError(
                f"{self.lost}: this process stops driving the run and writes nothing more (run {self.run_id!r}); "
                "the run continues in its new driver"
            )

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still the version we wrote."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        if not self.lost and self.tag is not None:
            try:
                self.store.delete_if(keys.LOCK_KEY, self.tag)
            except StoreError:  # the holder is gone: it will be taken over as abandoned
                pass


def _parse(data: bytes) -> dict:
    try:
        lock = json.loads(data)
    except ValueError:
        return {}  # unreadable: names no live holder, so it is abandoned
    return lock if isinstance(lock, dict) else {}


def acquire_lock(store: Store, run_id: str, ttl: float | None = None) -> RunLock:
    """Take the run's lock and start its heartbeat; this process's writes to the run then check it."""
    lock = RunLock(store, run_id, ttl).acquire().start()
    with _HELD_GUARD:
        previous = _HELD.pop(store.url, None)
        _HELD[store.url] = lock
    if previous is not None and previous is not lock:
        previous._stop.set()  # a re-acquisition by this process: one heartbeat per run
    return lock


def release_lock(store: Store) -> None:
    """Release this process's lock on the run in ``store`` (if it holds it)."""
    with _HELD_GUARD:
        lock = _HELD.pop(store.url, None)
    if lock is not None:
        lock.release()


def held_lock(url: str) -> RunLock | None:
    return _HELD.get(url)


def work_for(url: str, token: str) -> None:
    """This process (a Ray replica) writes the run in ``url`` for the driver whose lock token is ``token``: each of
    its writes first checks that the driver still holds the lock."""
    with _HELD_GUARD:
        _WORKING_FOR[url] = token


def driver_token(url: str) -> str | None:
    """The token of the lock this process holds on the run in ``url`` (handed to the processes working for it)."""
    lock = _HELD.get(url)
    return None if lock is None else lock.body["token"]


def write_guard(store: Store) -> Callable[[str], None]:
    """The guard ``run_store`` installs on a run's store: refuses writes once this process has lost the run's lock,
    or, in a process working for a driver, once that driver's lock is gone or taken over."""
    url = store.url

    def guard(key: str) -> None:
        lock = _HELD.get(url)
        if lock is not None:
            lock.check(key)
            return
        token = _WORKING_FOR.get(url)
        if token is None or key == keys.LOCK_KEY:
            return
        try:
            current = _parse(store.get_bytes(keys.LOCK_KEY))
        except MissingArtefactError:
            current = {}
        if current.get("token") != token:
            raise LockLostError(
                f"the driver this process works for no longer holds the lock of {url} "
                f"({'now host ' + str(current.get('host')) if current else 'it is gone'}); this process writes nothing "
                "more for it"
            )

    return guard
