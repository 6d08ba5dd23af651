"""The run's lock: ``lock.json``, created conditionally, names the live process that drives the run, so that two
processes never drive one run id at once. A lock whose holder is gone is taken over."""

from __future__ import annotations

import json
import os
import socket
import time

from tyr_core import keys
from tyr_core.errors import RunLockedError
from tyr_core.store import Store

LOCK_TTL_S = 600  # a lock not refreshed for this long is abandoned (the holder is on another host and died)


def _holder() -> dict:
    try:
        from prefect.runtime import flow_run

        flow_run_id = flow_run.id
    except Exception:  # outside a flow run
        flow_run_id = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "flow_run_id": flow_run_id, "time": time.time()}


def lock_is_abandoned(lock: dict) -> bool:
    """The lock's holder is gone: a dead process on this host, or no refresh for ``LOCK_TTL_S`` on another."""
    if lock.get("host") == socket.gethostname():
        try:
            os.kill(int(lock["pid"]), 0)
        except (ProcessLookupError, KeyError, ValueError, TypeError):  # gone, or a lock that names no process
            return True
        except PermissionError:
            return False
        return False
    return time.time() - float(lock.get("time", 0)) > LOCK_TTL_S


def acquire_lock(store: Store, run_id: str) -> None:
    """Take the run's lock with a conditional create; a live holder with another flow run id is refused."""
    me = _holder()
    for _ in range(3):
        if store.put_if_absent(keys.LOCK_KEY, json.dumps(me).encode()):
            return
        try:
            lock = json.loads(store.get_bytes(keys.LOCK_KEY))
        except Exception:  # released between our create and our read
            continue
        same_flow_run = me["flow_run_id"] is not None and lock.get("flow_run_id") == me["flow_run_id"]
        if same_flow_run or (lock.get("host"), lock.get("pid")) == (me["host"], me["pid"]) or lock_is_abandoned(lock):
            store.delete(keys.LOCK_KEY)
            continue
        raise RunLockedError(
            f"run {run_id!r} is being driven by another process (host {lock.get('host')}, pid {lock.get('pid')}, "
            f"flow run {lock.get('flow_run_id')}); wait for it to finish or cancel it first"
        )
    raise RunLockedError(f"could not take the lock of run {run_id!r}; try again")
