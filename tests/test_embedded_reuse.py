"""Two commands on one embedded SeaweedFS data folder: the second uses the server the first started, the server stays
up until its last live user is done, and users (or owners) killed with SIGKILL neither keep it up nor leave it behind.
Real ``weed`` on loopback; real process death through subprocesses."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tyr_core.errors import StoreError
from tyr_core.store import commit_bytes, read_verified
from tyr_runtime.seaweed import EmbeddedSeaweed
from tyr_runtime.seaweed_host import is_weed_of

_USER = """
import sys, time
import tyr_runtime.seaweed as sw
if sys.argv[2] == "orphan":  # as if the death signal were unavailable (not Linux): leases and the pid file must do
    sw.child_setup = lambda parent: (lambda: None)
server = sw.EmbeddedSeaweed(sys.argv[1]).start()
print(server.proc.pid if server.proc else server._joined_pid, server.endpoint_url, flush=True)
time.sleep(600)
"""


def weed_pids(data: Path) -> list[int]:
    """Every live ``weed`` serving ``data``."""
    data = data.resolve()
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and is_weed_of(int(p.name), data)]


def leases(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "tyr-users").glob("*"))


def spawn_user(data: Path, mode: str = "death-signal") -> tuple[subprocess.Popen, int, str]:
    """A process using the embedded server on ``data``; returns it, the server's pid and its endpoint."""
    proc = subprocess.Popen([sys.executable, "-c", _USER, str(data), mode], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line, f"the user process failed (status {proc.wait()})"
    return proc, int(line[0]), line[1]


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def wait_gone(pid: int, data: Path, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while is_weed_of(pid, data.resolve()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not is_weed_of(pid, data.resolve())


def round_trip(writer: EmbeddedSeaweed, reader: EmbeddedSeaweed, key: str) -> None:
    commit_bytes(writer.open_store("r"), key, key.encode(), "cfg")
    assert read_verified(reader.open_store("r"), key) == key.encode()


def test_a_second_user_shares_the_server_which_stops_after_the_last_one(tmp_path, caplog):
    data = tmp_path / "weed"
    first = EmbeddedSeaweed(data).start()
    try:
        pid = first.proc.pid
        second = EmbeddedSeaweed(data).start()
        assert second.joined and second.proc is None and not first.joined
        assert second.endpoint_url == first.endpoint_url and weed_pids(data) == [pid]
        assert second.client_options() == first.client_options()  # the pair in s3-credentials.json
        round_trip(first, second, "a.json")
        round_trip(second, first, "b.json")
        assert len(leases(data)) == 2

        with pytest.raises(StoreError, match=f"refuses this key pair: it serves {data}"):
            EmbeddedSeaweed(data, access_key="tyr-other", secret_key="x" * 40).start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(StoreError, match=f"serves {data} at {first.endpoint_url}, not on port {port}"):
            EmbeddedSeaweed(data, port=port).start()
        assert len(leases(data)) == 2  # the refused ones took no lease

        caplog.set_level(logging.WARNING, logger="tyr_runtime.seaweed")
        owner_exit = threading.Thread(target=first.stop)
        owner_exit.start()
        time.sleep(2)
        assert owner_exit.is_alive() and weed_pids(data) == [pid]  # the owner waits for the second user
        assert f"pids {os.getpid()}" in caplog.text and "waiting for the other tyr commands" in caplog.text
        round_trip(second, second, "c.json")
        second.stop()
        owner_exit.join(timeout=30)
        assert not owner_exit.is_alive()
        assert weed_pids(data) == [] and leases(data) == [] and not (data / "tyr-weed.pid.json").exists()
    finally:
        first.stop()

    with EmbeddedSeaweed(data) as again:  # a fresh server, with everything the two wrote
        assert not again.joined
        assert read_verified(again.open_store("r"), "c.json") == b"c.json"


def test_a_killed_user_does_not_keep_the_server_up(tmp_path):
    data = tmp_path / "weed"
    with EmbeddedSeaweed(data) as owner:
        pid = owner.proc.pid
        user, server_pid, endpoint = spawn_user(data)
        assert (server_pid, endpoint) == (pid, owner.endpoint_url) and len(leases(data)) == 2
        kill(user)
        assert len(leases(data)) == 2  # its lease stays behind, naming a dead pid
        round_trip(owner, owner, "a.json")
        started = time.monotonic()
    assert time.monotonic() - started < owner.stop_timeout + 5  # the stale lease was not waited for
    assert weed_pids(data) == [] and leases(data) == []


@pytest.mark.parametrize("mode", ["death-signal", "orphan"])
def test_a_killed_owner_leaves_no_server_behind(tmp_path, mode):
    """The owner is SIGKILLed while another command uses its server. With the death signal the server goes with it
    (the user's requests then fail, and its exit is clean); without it, the user keeps the server and, as its last
    user, stops it."""
    data = tmp_path / "weed"
    owner, pid, endpoint = spawn_user(data, mode)
    try:
        user = EmbeddedSeaweed(data).start()
        assert user.joined and user.endpoint_url == endpoint
        round_trip(user, user, "a.json")
    finally:
        kill(owner)
    if mode == "death-signal":
        assert wait_gone(pid, data)
    else:
        assert weed_pids(data) == [pid]
        round_trip(user, user, "b.json")  # the server outlived its owner: its user is not broken
    user.stop()
    assert wait_gone(pid, data, timeout=1) and weed_pids(data) == [] and leases(data) == []
    with EmbeddedSeaweed(data) as again:
        assert not again.joined
        assert read_verified(again.open_store("r"), "a.json") == b"a.json"


def test_an_orphan_whose_users_were_all_killed_is_stopped_by_the_next_start(tmp_path):
    data = tmp_path / "weed"
    owner, pid, _ = spawn_user(data, "orphan")
    user, joined_pid, _ = spawn_user(data)
    assert joined_pid == pid
    kill(user)
    kill(owner)
    assert weed_pids(data) == [pid] and len(leases(data)) == 2  # a server nobody uses any more, and two stale leases
    with EmbeddedSeaweed(data) as server:
        assert not server.joined and server.proc.pid != pid
        assert not is_weed_of(pid, data.resolve()) and weed_pids(data) == [server.proc.pid]
        round_trip(server, server, "a.json")
    assert weed_pids(data) == [] and leases(data) == []


def test_a_second_command_uses_the_running_store_and_says_so(tmp_path, capsys):
    """What ``tyr prune`` does without a store URL, twice on one data folder: one server, the same credentials."""
    import contextlib

    from tyr_cli.location import start_embedded

    data = tmp_path / "weed"
    with contextlib.ExitStack() as first_stack:
        first = start_embedded(first_stack, data)
        first_key = os.environ["AWS_ACCESS_KEY_ID"]
        with contextlib.ExitStack() as second_stack:
            second = start_embedded(second_stack, data)
            assert second == first and os.environ["AWS_ACCESS_KEY_ID"] == first_key
            assert len(weed_pids(data)) == 1
        assert "already running for another tyr command" in capsys.readouterr().err
        assert len(weed_pids(data)) == 1 and len(leases(data)) == 1  # the second command left; the server stays
        assert first.base().exists("nothing") is False  # and still answers the first
    assert weed_pids(data) == [] and leases(data) == []
