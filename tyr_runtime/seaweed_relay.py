"""The embedded SeaweedFS's only door: a TCP port on the host's loopback relayed to its S3 unix socket.

``weed mini`` opens a master, a volume server, a filer, an admin server and their gRPC ports; only S3 checks
credentials (the master hands out write tokens and deletes collections for anyone who asks, gRPC has no
authentication). So the server runs in a network namespace of its own, where all of them listen on a loopback that
nobody else shares, and the one port tyr publishes on the host is this relay to its S3 socket, which sits in a 0700
folder. Whoever connects to the relay still has to sign every request with the server's key pair.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_SIOCSIFFLAGS = 0x8914
_IFF_UP_LOOPBACK_RUNNING = 0x1 | 0x8 | 0x40
_CHUNK = 1 << 20
SHARED_PORTS_ENV = "TYR_WEED_SHARED_LOOPBACK"  # "1": run weed on the host's loopback (every port open to local users)


def enter_private_network(uid: int, gid: int) -> None:
    """In the forked child, before ``exec``: a user and network namespace of its own with only a loopback up. The
    user keeps its own uid and gid (files on disk stay its), and loses the namespace's capabilities at ``exec``.

    Raises:
        OSError: the kernel refuses unprivileged namespaces.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", _IFF_UP_LOOPBACK_RUNNING, b""))


def in_private_network(setup: Callable[[], None]) -> Callable[[], None]:
    """``setup`` (the server's other ``preexec_fn`` duties), then ``enter_private_network``."""
    uid, gid = os.getuid(), os.getgid()

    def preexec() -> None:
        setup()
        enter_private_network(uid, gid)

    return preexec


def private_network_error() -> str | None:
    """Why this host cannot give the server a network of its own (None when it can): tried in a throwaway child."""
    uid, gid = os.getuid(), os.getgid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            enter_private_network(uid, gid)
            os._exit(0)
        except OSError as err:
            os._exit(err.errno or 1)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return None if code == 0 else (os.strerror(code) if code > 0 else f"signal {-code}")


class S3Relay:
    """``127.0.0.1:port`` on the host, each connection relayed to the unix socket ``target``; threads, stopped with
    ``stop``. Raises ``OSError`` (``EADDRINUSE``) from the constructor when the port is taken."""

    def __init__(self, port: int, target: Path):
        self.port = port
        self.target = str(target)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind(("127.0.0.1", port))
            self._listener.listen(128)
        except OSError:
            self._listener.close()
            raise
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, name=f"tyr-s3-relay-{port}", daemon=True).start()

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for s in list(self._open):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._open.clear()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.connect(self.target)
        except OSError:  # the server is not up yet, or gone: the client sees a closed connection and retries
            server.close()
            client.close()
            return
        with self._lock:
            if self._stopped:
                server.close()
                client.close()
                return
            self._open |= {client, server}
        done = threading.Event()
        threading.Thread(target=self._pump, args=(server, client, done), daemon=True).start()
        self._pump(client, server, done)

    def _pump(self, src: socket.socket, dst: socket.socket, other_done: threading.Event) -> None:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        try:
            while n := src.recv_into(buf):
                dst.sendall(view[:n])
            dst.shutdown(socket.SHUT_WR)  # the other side sees the end of this direction
        except OSError:  # a reset on either side ends both directions: unblock the other pump
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        if other_done.is_set():
            self._close(src, dst)
        else:
            other_done.set()

    def _close(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._open.discard(s)
                s.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def start_relay(port: int, target: Path, server_pid: int, preexec: Callable[[], None]) -> subprocess.Popen:
    """The relay in a process of its own, which lives as long as the server ``server_pid`` does (so a server that
    outlives the command that started it stays reachable) and dies with it; ``preexec`` as for the server.

    Raises:
        OSError: the port is taken (``EADDRINUSE``) or the relay could not start.
    """
    command = [sys.executable, "-m", "tyr_runtime.seaweed_relay", str(port), str(target), str(server_pid)]
    from .seaweed_host import popen_for_process

    proc = popen_for_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        start_new_session=True,
        preexec_fn=preexec,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # "ready" once it listens, or "error <errno>"
    proc.stdout.close()
    if line != "ready":
        code = int(line.split()[1]) if line.startswith("error ") else errno.EIO
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()
        raise OSError(code, os.strerror(code))
    return proc


def stop_relay(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(OSError):
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str]) -> int:
    port, target, server_pid = int(argv[0]), Path(argv[1]), int(argv[2])
    try:
        relay = S3Relay(port, target)
    except OSError as err:
        print(f"error {err.errno or errno.EIO}", flush=True)
        return 1
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while _alive(server_pid):
            time.sleep(0.5)
    finally:
        relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
