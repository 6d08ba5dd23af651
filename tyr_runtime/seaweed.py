"""The embedded S3 server: SeaweedFS (``weed mini``) on loopback, free ports, data in the user's cache.

The CLI starts it when no store URL is configured and stops it afterwards; ``tyr store serve`` keeps it up. A second
command on the same data folder uses the server already running there: each user keeps a lease file (named by its pid)
in ``<data>/tyr-users/``, the command that started the server waits at exit until the other live users are done, and
leases of dead processes are ignored.
The server runs in a network namespace of its own, so its master, volume, filer, admin and gRPC ports are out of
every other local user's reach; the host sees one port, 127.0.0.1:<s3.port>, relayed to its S3 unix socket
(``seaweed_relay.py``), and S3 checks every request's signature: its key pair is generated once and kept in
``<data>/s3-credentials.json`` (mode 0600, in a 0700 data folder); give ``access_key``/``secret_key`` to use
another pair. JWT signing keys in ``<data>/security.toml`` (0600) also make the filer and volume servers refuse
requests the server did not sign. ``TYR_WEED_SHARED_LOOPBACK=1`` runs it on the host's loopback instead.
It runs with umask 077 (its files and its unix sockets are its owner's only), dies with the process that started it
(Linux: ``PR_SET_PDEATHSIG``), and records its pid in the data folder, so a later start finds and stops a server
whose owner was killed before it could stop it (one that has no live user left).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from tyr_core.errors import NoSuchBucketError, StoreCredentialsError, StoreError

from .seaweed_host import (
    CREDENTIALS_FILE,
    FIXED_FLAGS,
    GRPC_OFFSET,
    check_free_space,
    child_setup,
    choose_ports,
    default_data_dir,
    is_weed_of,
    load_or_create_credentials,
    load_or_create_security,
    popen_for_process,
    started_at,
    weed_binary,
    weed_pids_of,
)
from .seaweed_relay import SHARED_PORTS_ENV, in_private_network, private_network_error, start_relay, stop_relay
from .storage import S3Store

log = logging.getLogger(__name__)

BUCKET = "tyr"
_PORTS_FILE = "tyr-ports.json"
_LOCK_FILE = "tyr-weed.lock"  # held while a command starts, joins, leaves or stops the server: one at a time
_PID_FILE = "tyr-weed.pid.json"  # the running server: its pid and its owner's, so a later start can stop an orphan
_USERS_DIR = "tyr-users"  # one lease file per command using the server, named "<pid>-<random>", holding its start time


class EmbeddedSeaweed:
    """``with EmbeddedSeaweed() as s3: ... s3.endpoint_url ...``: SeaweedFS on loopback, stopped on exit.

    Args:
        data_dir: where the data lives (default ``~/.cache/tyr/seaweedfs``, or ``$TYR_CACHE/seaweedfs``).
        port: the S3 port (default: a free one, the previous one when still free).
        startup_timeout: seconds to wait for S3 to answer and the bucket to exist.
        bucket: the bucket to create.
        access_key, secret_key: credentials the server requires; when None, the pair kept in
            ``data_dir/s3-credentials.json`` (generated on first use).
        stop_timeout: seconds between SIGTERM and SIGKILL when stopping.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        startup_timeout: float = 60,
        *,
        bucket: str = BUCKET,
        access_key: str | None = None,
        secret_key: str | None = None,
        stop_timeout: float = 15,
    ):
        if (access_key is None) != (secret_key is None):
            raise StoreError("give the embedded SeaweedFS both access_key and secret_key, or neither (generated)")
        self.data_dir = Path(data_dir or default_data_dir()).expanduser().resolve()
        self.requested_port = port
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.bucket = bucket
        self._access_key, self._secret_key = access_key, secret_key
        self.log = self.data_dir / "weed.log"
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self._sockets: Path | None = None
        self._lock: IO[bytes] | None = None
        self._lease: Path | None = None  # our file in <data>/tyr-users while we use the server
        self._joined_pid: int | None = None  # the server's pid when another command started it
        self._waiting_for: list[int] = []
        self._log_start = 0
        self._last_error = ""
        self._relay: subprocess.Popen | None = None  # the host's only way in: 127.0.0.1:<s3.port> -> S3's socket
        self._relay_port_taken = False

    def __repr__(self) -> str:
        return f"EmbeddedSeaweed(data_dir={str(self.data_dir)!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def endpoint_url(self) -> str:
        if not self.ports:
            raise StoreError("the embedded SeaweedFS is not started")
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def store_url(self) -> str:
        return f"s3://{self.bucket}"

    @property
    def credentials_file(self) -> Path:
        return self.data_dir / CREDENTIALS_FILE

    def client_options(self) -> dict[str, str]:
        """Credentials a client should pass to ``S3Store``/``open_store``: the pair the server requires."""
        if self._access_key is None:
            self._access_key, self._secret_key = load_or_create_credentials(self.data_dir)
        return {"access_key": str(self._access_key), "secret_key": str(self._secret_key)}

    def open_store(self, prefix: str = "", **options: Any) -> S3Store:
        """An ``S3Store`` on this server's bucket."""
        return S3Store(self.bucket, prefix, endpoint_url=self.endpoint_url, **{**self.client_options(), **options})

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def joined(self) -> bool:
        """Whether this uses a server that another command started (and that outlives this one if others use it)."""
        return self._joined_pid is not None

    def running(self) -> bool:
        """Whether the server this uses is still up."""
        if self.proc is not None:
            return self.proc.poll() is None
        return self._joined_pid is not None and is_weed_of(self._joined_pid, self.data_dir)

    def start(self) -> EmbeddedSeaweed:
        """Use the server already running on the data folder, or start one and wait until S3 answers and the bucket
        exists (retried on a port race)."""
        if self._lease is not None:
            if self.running():
                return self
            self._leave(force=True)  # our server is gone: drop the old lease, or it would count as another user
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.data_dir, 0o700)  # its objects, logs and credentials are the user's only
        check_free_space(self.data_dir)
        self._take_data_dir()
        try:
            if self._join_running():
                return self
            self._stop_orphan()
            self.client_options()  # generated before the server reads them
            load_or_create_security(self.data_dir)
            self._check_private_network()
            for attempt in range(3):
                self._spawn(choose_ports(None if attempt else self._saved_ports(), self.requested_port))
                if self._wait_ready():
                    self._save_ports()
                    self._save_pid()
                    self._take_lease()
                    return self
                if not self._lost_port_race() or self.requested_port:
                    break
            raise self._startup_failed()
        except BaseException:
            self._leave(force=True)  # nobody else uses a server that never answered
            atexit.unregister(self.stop)
            raise
        finally:
            self._release_data_dir()

    def stop(self) -> None:
        """Stop using the server. The last live user stops it (SIGTERM to its process group, SIGKILL after
        ``stop_timeout``); the command that started it first waits for the others (Ctrl-C stops it at once).
        Idempotent."""
        announced = False
        try:
            # The server dies with its owner (PR_SET_PDEATHSIG), so the owner outlives its users rather than hand over.
            while not self._leave(force=False):
                if not announced:
                    announced = True
                    log.warning(
                        "waiting for the other tyr commands using the embedded SeaweedFS at %s (pids %s) to finish "
                        "before stopping it; Ctrl-C stops it now, and them with it",
                        self.endpoint_url,
                        ", ".join(map(str, self._waiting_for)),
                    )
                time.sleep(0.5)
        finally:
            self._leave(force=True)  # nothing left to do after a normal leave; after Ctrl-C, stop the server now
            atexit.unregister(self.stop)

    def __enter__(self) -> EmbeddedSeaweed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ internals

    def _take_data_dir(self) -> None:
        """Take the data folder's lock, waiting while another command starts or stops its server: two servers on
        one folder would corrupt each other's metadata."""
        if self._lock is not None:
            return
        path = self.data_dir / _LOCK_FILE
        lock = open(path, "ab")
        waited = 3 * self.startup_timeout + self.stop_timeout + 30  # the longest another start or stop can take
        deadline = time.monotonic() + waited
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock.close()
                    raise StoreError(
                        f"another process has held the lock {path} of the embedded SeaweedFS's data folder "
                        f"{self.data_dir} for over {waited:g} s (starting or stopping its server); wait for it or stop "
                        "it, or give another data folder (TYR_CACHE, or --dir for `tyr store serve`)"
                    ) from None
                time.sleep(0.2)
        self._lock = lock

    def _release_data_dir(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _join_running(self) -> bool:
        """Use the server already running on the data folder if it has live users; False if there is none (or
        only an orphan, which ``_stop_orphan`` then stops). Holds the data folder's lock."""
        pid = self._running_pid()
        users = self._other_users()
        if pid is None or not users:
            return False
        ports = self._saved_ports()
        where = f"the embedded SeaweedFS (pid {pid}) that tyr commands (pids {', '.join(map(str, users))}) use"
        if not ports or "s3.port" not in ports:
            raise StoreError(
                f"{where} has no readable ports file {self.data_dir / _PORTS_FILE}; wait for them to finish, or give "
                "another data folder"
            )
        if self.requested_port and self.requested_port != ports["s3.port"]:
            raise StoreError(
                f"{where} serves {self.data_dir} at http://127.0.0.1:{ports['s3.port']}, not on port "
                f"{self.requested_port}: use that endpoint, wait for them to finish, or give another data folder"
            )
        self.ports = ports
        probe = self.open_store(connect_timeout=2, read_timeout=10, max_attempts=3)
        try:
            probe.check()
        except StoreCredentialsError:
            self.ports = {}
            raise StoreError(
                f"{where} refuses this key pair: it serves {self.data_dir} with another one. Give no access_key and "
                f"secret_key (its pair is in {self.credentials_file}), or wait for them to finish"
            ) from None
        except StoreError as err:
            self.ports = {}
            raise StoreError(
                f"{where} does not answer at http://127.0.0.1:{ports['s3.port']} ({err}). Its log is {self.log}; wait "
                f"for them to finish, stop it (kill {pid}), or give another data folder"
            ) from None
        self._joined_pid = pid
        self._take_lease()
        return True

    def _running_pid(self) -> int | None:
        """The pid of the ``weed`` that the pid file names, if it is alive and serves this data folder."""
        record = self._pid_record()
        pid = record.get("pid") if record else None
        return pid if isinstance(pid, int) and pid > 1 and is_weed_of(pid, self.data_dir) else None

    def _pid_record(self) -> dict[str, Any] | None:
        try:
            record = json.loads((self.data_dir / _PID_FILE).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _take_lease(self) -> None:
        users = self.data_dir / _USERS_DIR
        users.mkdir(mode=0o700, exist_ok=True)
        lease = users / f"{os.getpid()}-{secrets.token_hex(4)}"
        lease.write_text(str(started_at(os.getpid())))
        self._lease = lease
        atexit.register(self.stop)

    def _other_users(self) -> list[int]:
        """The pids of the live processes with a lease on the server, ours aside; stale leases are removed."""
        pids = []
        for lease in sorted((self.data_dir / _USERS_DIR).glob("*")):
            if lease == self._lease:
                continue
            try:
                pid = int(lease.name.split("-")[0])
                live = started_at(pid) == lease.read_text()
            except (OSError, ValueError):
                live = False
            if live:
                pids.append(pid)
            else:
                lease.unlink(missing_ok=True)
        return pids

    def _leave(self, force: bool) -> bool:
        """Give up our lease, and stop the server if we are its last live user; False (and nothing done) while we
        started it and others still use it, unless ``force``."""
        if self._lease is None and self.proc is None and self._sockets is None and self._joined_pid is None:
            return True
        had_lock = self._lock is not None
        try:
            self._take_data_dir()
        except StoreError as err:  # a stuck start elsewhere must not keep our server up: go on without the lock
            log.warning("%s", err)
        try:
            others = self._other_users()
            if others and not force and self.proc is not None and self.proc.poll() is None:
                self._waiting_for = others
                return False
            if self._lease is not None:
                self._lease.unlink(missing_ok=True)
                self._lease = None
            if self.proc is not None:
                pid = self.proc.pid
                self._stop_process()
                if self._running_pid() is None and (self._pid_record() or {}).get("pid") == pid:
                    (self.data_dir / _PID_FILE).unlink(missing_ok=True)
            elif self._joined_pid is not None and not others:
                self._stop_orphan()  # its owner is gone (it could not take the server down with it) and so are we
            self._joined_pid = None
            if self._sockets is not None:
                shutil.rmtree(self._sockets, ignore_errors=True)
                self._sockets = None
            return True
        finally:
            if not had_lock:
                self._release_data_dir()

    def _stop_orphan(self) -> None:
        """Stop every server of this data folder (we hold the data folder's lock and it has no live user left): the
        one the pid file names, and any whose owner was killed before it wrote one. Each would hold SeaweedFS's own
        locks on the data and make a new server exit."""
        pids = weed_pids_of(self.data_dir)
        if not pids:
            return
        deadline = time.monotonic() + self.stop_timeout
        for sig, until in ((signal.SIGTERM, deadline), (signal.SIGKILL, deadline + 10)):
            for pid in self._live(pids):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            while self._live(pids) and time.monotonic() < until:
                time.sleep(0.1)
        _remove_grpc_sockets(self._saved_ports() or {})
        sockets = Path(str((self._pid_record() or {}).get("sockets", "")))
        if sockets.name.startswith("tyr-weed-") and sockets.parent == Path(tempfile.gettempdir()):
            shutil.rmtree(sockets, ignore_errors=True)
        (self.data_dir / _PID_FILE).unlink(missing_ok=True)

    def _live(self, pids: list[int]) -> list[int]:
        return [pid for pid in pids if is_weed_of(pid, self.data_dir)]

    @staticmethod
    def private_network() -> bool:
        """Whether the server runs in a network namespace of its own (the default), every port but the relayed S3
        one out of other local users' reach; ``TYR_WEED_SHARED_LOOPBACK=1`` puts them on the host's loopback."""
        return os.environ.get(SHARED_PORTS_ENV) != "1"

    def _check_private_network(self) -> None:
        if not self.private_network():
            return
        why = private_network_error()
        if why is not None:
            raise StoreError(
                f"cannot give the embedded SeaweedFS a network of its own ({why}: this host refuses unprivileged user "
                "namespaces). Without one, its master, filer and volume ports on 127.0.0.1 answer every local user. "
                "Allow user namespaces (sysctl kernel.unprivileged_userns_clone=1, or a container run with them), use "
                f"another S3 store (TYR_STORE_URL, TYR_S3_ENDPOINT_URL), or, on a host with no other users, set "
                f"{SHARED_PORTS_ENV}=1"
            )

    def _save_pid(self) -> None:
        assert self.proc is not None
        record = {
            "pid": self.proc.pid,
            "owner_pid": os.getpid(),
            "endpoint_url": self.endpoint_url,
            "sockets": str(self._sockets),
        }
        with contextlib.suppress(OSError):
            (self.data_dir / _PID_FILE).write_text(json.dumps(record))

    def _command(self, ports: dict[str, int]) -> list[str]:
        assert self._sockets is not None
        return [
            weed_binary(),
            f"-logdir={self.data_dir / 'logs'}",  # glog files, which otherwise litter /tmp
            "mini",
            f"-dir={self.data_dir}",
            *FIXED_FLAGS,
            f"-filer.localSocket={self._sockets / 'filer.sock'}",  # default /tmp/seaweedfs-*.sock outlive the server
            f"-s3.localSocket={self._sockets / 's3.sock'}",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]

    def _environment(self) -> dict[str, str]:
        # weed reads AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY as its admin identity (and then refuses any request not
        # signed with it): pass only ours, never the user's.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        creds = self.client_options()
        return env | {"AWS_ACCESS_KEY_ID": creds["access_key"], "AWS_SECRET_ACCESS_KEY": creds["secret_key"]}

    def _spawn(self, ports: dict[str, int]) -> None:
        self._stop_process()
        self.ports = ports
        (self.data_dir / "logs").mkdir(exist_ok=True)
        # a private (0700) folder with a random name; short: AF_UNIX paths <= 107
        self._sockets = self._sockets or Path(tempfile.mkdtemp(prefix="tyr-weed-"))
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        private = self.private_network()
        with open(self.log, "ab") as log:
            self.proc = popen_for_process(
                self._command(ports),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                cwd=self.data_dir,  # where weed reads security.toml
                start_new_session=True,  # its own process group: stop() signals the whole group
                preexec_fn=in_private_network(child_setup(os.getpid())) if private else child_setup(os.getpid()),
            )
        atexit.register(self.stop)
        self._relay_port_taken = False
        if private:
            try:
                self._relay = start_relay(
                    ports["s3.port"], self._sockets / "s3.sock", self.proc.pid, child_setup(os.getpid())
                )
            except OSError as err:  # taken since the ports were chosen: a port race, started again on others
                self._relay_port_taken = True
                self._last_error = err.strerror or str(err)

    def _stop_process(self) -> None:
        relay, self._relay = self._relay, None
        stop_relay(relay)
        proc, self.proc = self.proc, None
        if proc is not None:
            _terminate_group(proc, self.stop_timeout)
            _remove_grpc_sockets(self.ports)

    def _wait_ready(self) -> bool:
        """True once a LIST on the bucket works (creating the bucket if needed); False if the process died
        or the time ran out."""
        probe = self.open_store(connect_timeout=1, read_timeout=2, max_attempts=1)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None or self._relay_port_taken:
                return False
            try:
                probe.check()
                return True
            except NoSuchBucketError:
                with contextlib.suppress(StoreError):
                    probe.create_bucket()
            except StoreError as err:  # not listening yet, or filer still starting
                self._last_error = str(err)
            time.sleep(0.2)
        return False

    def _log_tail(self, chars: int = 3000) -> str:
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as f:
            f.seek(max(self._log_start, self.log.stat().st_size - chars))
            return f.read().decode(errors="replace")

    def _lost_port_race(self) -> bool:
        if self._relay_port_taken:
            return True
        tail = self._log_tail().lower()
        return "address already in use" in tail or "port allocation failed" in tail

    def _startup_failed(self) -> StoreError:
        if self._relay_port_taken:
            return StoreError(
                f"the embedded SeaweedFS could not listen at {self.endpoint_url} ({self._last_error}); give another "
                "port, or none (a free one is chosen)"
            )
        code = self.proc.poll() if self.proc is not None else None
        state = f"exited with status {code}" if code is not None else f"did not answer in {self.startup_timeout:g} s"
        last = self._last_error
        return StoreError(
            f"the embedded SeaweedFS {state} at {self.endpoint_url} (data in {self.data_dir})"
            + (f"; last error: {last}" if last else "")
            + f". Its log {self.log} ends with:\n{self._log_tail()}"
        )

    def _saved_ports(self) -> dict[str, int] | None:
        try:
            return {k: int(v) for k, v in json.loads((self.data_dir / _PORTS_FILE).read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return None

    def _save_ports(self) -> None:
        with contextlib.suppress(OSError):
            (self.data_dir / _PORTS_FILE).write_text(json.dumps(self.ports, indent=1))


def _terminate_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process group, then SIGKILL it if the server outlives ``timeout``; reaps the leader."""
    if proc.poll() is not None:
        return  # reaped: its group id may belong to someone else by now, so never signal it
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)  # the leader is not reaped yet, so the group id is still ours
        proc.wait(timeout=10)


def _remove_grpc_sockets(ports: dict[str, int]) -> None:
    """weed leaves some of its gRPC unix sockets behind when stopped, at a path it does not let us choose
    (``/tmp/seaweedfs-<service>-grpc-<port>.sock``, created under the server's umask 077, so only its owner can
    connect); named after our ports, they are ours to remove once it is gone."""
    grpc_ports = {port for flag, port in ports.items() if flag.endswith(".grpc")}
    if "admin.port" in ports:
        grpc_ports.add(ports["admin.port"] + GRPC_OFFSET)
    for port in grpc_ports:
        for path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            if path.is_socket():
                path.unlink(missing_ok=True)


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
