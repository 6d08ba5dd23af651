"""The temporary local Prefect server of a ``tyr prune`` without ``PREFECT_API_URL``, started by the command itself in
a session of its own: the terminal's Ctrl-C reaches the command only, which reports the interrupted run to the
server and then stops it, before the embedded store."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

# Prefect's default is 20 s, read from settings fixed when prefect is first imported; a loaded 2-core host needs more.
STARTUP_TIMEOUT_S = 120


class _SessionSubprocess:
    """The ``subprocess`` module as Prefect's server module sees it while it starts the server: ``Popen`` opens a new
    session (no terminal signals) and arms a death signal (the server goes when the command is killed)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 - subprocess's own name
        from tyr_runtime.seaweed_host import child_setup

        kwargs.setdefault("start_new_session", True)
        kwargs.setdefault("preexec_fn", child_setup(os.getpid()))
        return subprocess.Popen(*args, **kwargs)


def _server_class() -> type:
    from prefect.server.api import server as prefect_server

    class SessionServer(prefect_server.SubprocessASGIServer):
        """Prefect's temporary server (the one its clients start when no API URL is set), in its own session."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            module = sys.modules[prefect_server.SubprocessASGIServer.__module__]
            saved = module.subprocess
            module.subprocess = _SessionSubprocess()
            try:
                return super()._run_uvicorn_command()
            finally:
                module.subprocess = saved

    return SessionServer


@contextlib.contextmanager
def temporary_prefect_server() -> Iterator[str]:
    """Start the temporary server now, in the main thread (its death signal follows the thread that started it), as
    the instance every Prefect client of this process uses; stop it when the block ends, after the log and event
    workers have sent what they hold. Yields the API URL."""
    from prefect.server.api.server import SubprocessASGIServer

    existing = SubprocessASGIServer._instances.get(None)
    if existing is not None and existing.running:  # an earlier command of this process (a test, a notebook)
        yield existing.api_url
        return
    SubprocessASGIServer._instances.pop(None, None)
    server = _server_class()()  # registered under port None: the instance Prefect's get_client() returns
    server.start(timeout=STARTUP_TIMEOUT_S)
    try:
        yield server.api_url
    finally:
        drain_prefect_workers()
        server.stop()


def drain_prefect_workers() -> None:
    """Send the logs and events Prefect's background workers still hold, while the server is up."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(Exception):
        APILogWorker.drain_all(timeout=10)
    with contextlib.suppress(Exception):
        EventsWorker.drain_all(timeout=10)
