"""Flow-run heartbeats that stop the moment a run ends.

Prefect 3.8.8 emits a flow run's heartbeats from a thread that waits between them in 1 s ``time.sleep`` steps, and
its engine joins that thread when the run ends. Every run's end therefore waits for the step in progress: 0-1 s,
0.5 s on average, a quarter of the tiny preset's whole orchestration overhead and the reason the flow's times came in
whole seconds (``python bench/orchestration.py``). Prefect 3.9.1 (the newest release, not installable here: see
OFFLINE.md) does the same.

``install()`` swaps the engine's heartbeat context for one that waits on its stop event instead, so the join returns
at once. Nothing else changes: the same ``prefect.flow-run.heartbeat`` events from the same engine methods, at the
same frequency, stopping when the run reaches a final state. It installs itself only on the Prefect release it was
written against; any other release keeps its own heartbeats, which are correct, only slower to stop.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import prefect
from prefect import flow_engine

FIXED_RELEASES = ("3.8.8",)  # releases whose _send_heartbeats this replaces (checked against their source)


@contextmanager
def send_heartbeats(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
    """Prefect's ``_send_heartbeats`` contract: heartbeat ``engine``'s flow run while the context is open."""
    seconds = engine.heartbeat_seconds
    if seconds is None:  # heartbeats are off (flows.heartbeat_frequency)
        yield
        return
    seconds = max(seconds, flow_engine.MINIMUM_HEARTBEAT_INTERVAL)
    resource, related = engine._build_heartbeat_event_template()
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            state = engine.flow_run.state if engine.flow_run else None
            if state is not None and state.is_final():
                return
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:  # a lost heartbeat must not fail the run (Prefect's own loop does the same)
                engine.logger.debug("Failed to emit heartbeat", exc_info=True)
            stop.wait(seconds)  # the fix: wakes the moment the run ends

    # the thread runs in a copy of this context, so it sees the run's settings (API URL) as Prefect's does
    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if join_on_exit:
            thread.join(timeout=2)


def install() -> bool:
    """Use ``send_heartbeats`` for every flow run in this process; True if it is (a fixed release), else False."""
    if prefect.__version__ not in FIXED_RELEASES:
        return False
    flow_engine._send_heartbeats = send_heartbeats  # looked up by name at each run's start
    return True
