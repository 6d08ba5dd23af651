"""The run's lock: ``lock.json`` names the live process that drives the run, so that two processes never drive one
run id at once.

It is created conditionally (``put_if_absent``) and, while the run lives, refreshed by a heartbeat thread every
``ttl / 10`` seconds with a compare-and-swap (``replace_if``: S3 ``If-Match`` on the ETag, a locked compare on the
file store). A lock whose holder is gone (a dead process on this host, or no refresh for ``ttl`` seconds) is taken
over with the same compare-and-swap on the version that was read, never by a delete then a create, so of two
drivers racing for it exactly one wins. A holder whose refresh finds the lock changed has lost it: from then on every
write of the run's store in that process raises ``LockLostError`` (``run_store`` installs the guard), so the run
stops instead of writing beside its new driver.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from tyr_core import keys
from tyr_core.errors import LockLostError, MissingArtefactError, RunLockedError, StoreError
from tyr_core.store import Store

# a lock not refreshed for this long is abandoned (its holder, on another host, died); TYR_LOCK_TTL_S overrides it
LOCK_TTL_S = float(os.environ.get("TYR_LOCK_TTL_S", "600"))

_HELD: dict[str, RunLock] = {}  # the locks this process holds, by the run store's URL
_HELD_GUARD = threading.Lock()


def _now() -> float:
    return time.time()


def _holder(ttl: float, identity: dict | None = None) -> dict:
    try:
        from prefect.runtime import flow_run

        flow_run_id = flow_run.id
    except Exception:  # outside a flow run
        flow_run_id = None
    me = {"host": socket.gethostname(), "pid": os.getpid(), "flow_run_id": flow_run_id}
    return me | (identity or {}) | {"time": _now(), "ttl": ttl, "token": uuid.uuid4().hex, "beat": 0}


def lock_is_abandoned(lock: dict) -> bool:
    """The lock's holder is gone: a dead process on this host, or no refresh for the lock's ttl on another."""
    if lock.get("host") == socket.gethostname():
        try:
            os.kill(int(lock["pid"]), 0)
        except (ProcessLookupError, KeyError, ValueError, TypeError):  # gone, or a lock that names no process
            return True
        except PermissionError:
            return False
        return False
    try:
        return _now() - float(lock.get("time", 0)) > float(lock.get("ttl", LOCK_TTL_S))
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
        self.body = _holder(self.ttl, identity)
        self.tag: str | None = None
        self.lost: str | None = None
        self._last_ok = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ taking it

    def _may_take(self, lock: dict) -> bool:
        me = self.body
        same_flow_run = me["flow_run_id"] is not None and lock.get("flow_run_id") == me["flow_run_id"]
        same_process = (lock.get("host"), lock.get("pid")) == (me["host"], me["pid"])
        return same_flow_run or same_process or lock_is_abandoned(lock)

    def acquire(self) -> RunLock:
        """Take the lock: create it, or take over an abandoned one (compare-and-swap on the version read).

        Raises:
            RunLockedError: a live holder (another process, another flow run) has it.
        """
        data = json.dumps(self.body).encode()
        for _ in range(5):
            if self.store.put_if_absent(keys.LOCK_KEY, data):
                if self._reread_is_mine():
                    return self
                continue
            try:
                current, tag = self.store.get_tagged(keys.LOCK_KEY)
            except MissingArtefactError:  # released between our create and our read
                continue
            lock = _parse(current)
            if lock.get("token") == self.body["token"]:  # our create landed although its answer was lost
                self.tag = tag
                return self
            if not self._may_take(lock):
                raise RunLockedError(
                    f"run {self.run_id!r} is being driven by another process (host {lock.get('host')}, pid "
                    f"{lock.get('pid')}, flow run {lock.get('flow_run_id')}); wait for it to finish or cancel it first"
                )
            new_tag = self.store.replace_if(keys.LOCK_KEY, data, tag)
            if new_tag is not None or self._reread_is_mine():
                self.tag = new_tag or self.tag
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
        try:
            new_tag = self.store.replace_if(keys.LOCK_KEY, json.dumps(self.body).encode(), str(self.tag))
            if new_tag is None and not self._reread_is_mine():  # a lost answer to a write that landed is still ours
                holder = self._current_holder()
                self.lost = f"the lock of run {self.run_id!r} was taken over ({holder})"
                return False
        except StoreError as err:
            self.body = previous
            if time.monotonic() - self._last_ok > self.ttl - self.interval:
                self.lost = f"the lock of run {self.run_id!r} could not be refreshed for {self.ttl:g} s ({err})"
                return False
            return True
        self.tag = new_tag or self.tag
        self._last_ok = time.monotonic()
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

    def check(self, key: str | None = None) -> None:
        """Raise ``LockLostError`` if the lock was lost (the lock's own key is exempt: releasing it is fine)."""
        if self.lost and key != keys.LOCK_KEY:
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


def write_guard(url: str) -> Callable[[str], None]:
    """The guard ``run_store`` installs on a run's store: refuses writes once this process has lost the run's lock."""

    def guard(key: str) -> None:
        lock = _HELD.get(url)
        if lock is not None:
            lock.check(key)

    return guard
