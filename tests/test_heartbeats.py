"""flows/heartbeats.py: the flow-run heartbeat context that stops when the run ends. Against a stand-in engine: the
heartbeat itself (Prefect's own event, built by Prefect's engine methods) reaching a real server is checked by
tests/test_flow.py."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import prefect
from prefect import flow_engine

from flows import heartbeats


class Engine:
    """The parts of Prefect's FlowRunEngine that the heartbeat context uses."""

    def __init__(self, seconds: int | None) -> None:
        self.heartbeat_seconds = seconds
        self.flow_run = SimpleNamespace(state=SimpleNamespace(is_final=lambda: False))
        self.logger = SimpleNamespace(debug=lambda *a, **k: None)
        self.beats = threading.Semaphore(0)

    def _build_heartbeat_event_template(self):
        return {"prefect.resource.id": "prefect.flow-run.x"}, []

    def _emit_flow_run_heartbeat(self, resource, related) -> None:
        assert resource == {"prefect.resource.id": "prefect.flow-run.x"} and related == []
        self.beats.release()


def test_a_run_beats_at_once_and_its_end_does_not_wait_out_the_interval():
    engine = Engine(seconds=45)
    before = set(threading.enumerate())
    with heartbeats.send_heartbeats(engine):
        assert engine.beats.acquire(timeout=30)  # the first heartbeat is sent when the run starts
        started = set(threading.enumerate()) - before
        assert len(started) == 1
    # exit joined the thread (Prefect's join gives up after 2 s): it was waiting on its stop event, which wakes it, not
    # in a 45 s wait for the next heartbeat
    assert not any(thread.is_alive() for thread in started)
    assert not engine.beats.acquire(timeout=0)


def test_no_thread_when_heartbeats_are_off_and_none_after_a_final_state():
    before = set(threading.enumerate())
    with heartbeats.send_heartbeats(Engine(seconds=None)):
        assert not set(threading.enumerate()) - before
    finished = Engine(seconds=30)
    finished.flow_run.state = SimpleNamespace(is_final=lambda: True)
    with heartbeats.send_heartbeats(finished):
        pass
    assert not finished.beats.acquire(timeout=0)


def test_installed_only_on_the_release_it_was_written_for(monkeypatch):
    def prefects_own(engine, join_on_exit=True):  # stands for Prefect's function, whatever is installed now
        raise AssertionError("not called")

    monkeypatch.setattr(flow_engine, "_send_heartbeats", prefects_own)  # the real one is restored after the test
    monkeypatch.setattr(prefect, "__version__", "9.9.9")
    assert heartbeats.install() is False and flow_engine._send_heartbeats is prefects_own
    monkeypatch.setattr(prefect, "__version__", heartbeats.FIXED_RELEASES[0])
    assert heartbeats.install() is True and flow_engine._send_heartbeats is heartbeats.send_heartbeats


def test_the_pinned_prefect_is_a_release_the_fix_was_written_for():
    """Upgrading Prefect (pyproject pins it) must come with a look at its _send_heartbeats and this list."""
    assert prefect.__version__ in heartbeats.FIXED_RELEASES
