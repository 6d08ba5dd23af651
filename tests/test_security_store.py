"""The embedded SeaweedFS is its owner's only: every port ``weed mini`` opens (master, volume, filer, S3, admin and
their gRPC ports, as listed in ``tyr-ports.json``) refuses unauthenticated reads, writes and deletes, on a real
server holding real objects."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tyr_core.errors import StoreError
from tyr_runtime import seaweed as sw
from tyr_runtime.seaweed import EmbeddedSeaweed
from tyr_runtime.seaweed_host import GRPC_OFFSET, PORT_FLAGS, SECURITY_FILE

SECRET = b"model weights or calibration text " * 4096  # big enough to live in a volume, not inline in the filer
KEY = "runs/r1/secret.bin"

# what a local user without the key pair would try on each port: the filer's paths, the master's assign and
# collection delete, the volume server's needles, the admin server's API, and plain object paths
ATTEMPTS = [
    ("GET", f"/buckets/tyr/{KEY}", None),
    ("GET", "/buckets/tyr/?pretty=y", None),
    ("PUT", "/buckets/tyr/runs/r1/planted.bin", b"planted"),
    ("POST", "/buckets/tyr/runs/r1/planted.bin", b"planted"),
    ("DELETE", f"/buckets/tyr/{KEY}", None),
    ("GET", "/dir/assign", None),
    ("GET", "/dir/lookup?volumeId=1", None),
    ("GET", "/vol/status", None),
    ("GET", "/col/delete?collection=tyr", None),
    ("GET", "/1,01637037d6", None),
    ("DELETE", "/1,01637037d6", None),
    ("GET", "/api/cluster/topology", None),
    ("GET", f"/tyr/{KEY}", None),
    ("PUT", "/tyr/runs/r1/planted.bin", b"planted"),
    ("DELETE", f"/tyr/{KEY}", None),
]


def _http(method: str, url: str, body: bytes | None) -> int | str:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method=method), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, urllib.error.URLError) as err:  # refused, reset, not HTTP: nothing was served
        return type(err).__name__


def test_every_port_in_the_ports_file_refuses_unauthenticated_reads_writes_and_deletes(tmp_path):
    data = tmp_path / "weed"
    with EmbeddedSeaweed(data) as server:
        store = server.open_store()
        store.put_bytes(KEY, SECRET)
        ports = json.loads((data / "tyr-ports.json").read_text())
        assert set(ports) == set(PORT_FLAGS)
        every = {**ports, "admin.port.grpc": ports["admin.port"] + GRPC_OFFSET}  # the worker dials admin + 10000
        served = [
            (name, method, path, status)
            for name, port in every.items()
            for method, path, body in ATTEMPTS
            if isinstance(status := _http(method, f"http://127.0.0.1:{port}{path}", body), int) and status < 400
        ]
        assert served == []
        assert store.get_bytes(KEY) == SECRET  # nothing deleted, nothing planted
        assert store.list("runs/r1/") == [KEY]


def test_the_servers_signing_keys_are_generated_private_beside_the_key_pair(tmp_path):
    data = tmp_path / "weed"
    with EmbeddedSeaweed(data) as server:
        server.open_store().put_bytes("k", b"v")
        security = data / SECURITY_FILE
        assert security.stat().st_mode & 0o777 == 0o600
        text = security.read_text()
        for section in ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"):
            assert f'[{section}]\nkey = "' in text
        first = text
    with EmbeddedSeaweed(data) as server:  # kept across starts: the same keys sign the same data
        assert server.open_store().get_bytes("k") == b"v"
    assert security.read_text() == first


def test_a_host_without_private_networks_is_refused_unless_the_user_accepts_shared_ports(tmp_path, monkeypatch):
    monkeypatch.delenv("TYR_WEED_SHARED_LOOPBACK", raising=False)
    monkeypatch.setattr(sw, "private_network_error", lambda: "Operation not permitted")
    with pytest.raises(StoreError, match=r"network of its own.*TYR_WEED_SHARED_LOOPBACK=1"):
        EmbeddedSeaweed(tmp_path / "weed").start()


def test_store_serve_says_where_the_key_pair_is_and_never_prints_the_secret(tmp_path, capsys):
    from tyr_cli.store import announce_server

    with EmbeddedSeaweed(tmp_path / "weed") as server:
        secret = server.client_options()["secret_key"]
        announce_server(server, as_json=False)
        text = capsys.readouterr().out
        announce_server(server, as_json=True)
        as_json = capsys.readouterr().out
    assert secret not in text and secret not in as_json
    assert str(server.credentials_file) in text and server.endpoint_url in text
