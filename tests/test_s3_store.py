"""The S3 store against real S3 servers on loopback: moto's server (fast) and SeaweedFS (slow, the embedded
default). Conditional creates, verified commits, fault injection, and clear errors without credentials."""

from __future__ import annotations

import logging
import random
import socket

import pytest
from botocore.exceptions import EndpointConnectionError

from tasks.storage import S3Store, open_store, run_store
from tyr_core.errors import CorruptArtefactError, StoreError
from tyr_core.store import commit_bytes, fetch_verified, read_verified

SECRET = "s3cr3t-never-logged"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    port = _port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    S3Store("tyr", endpoint_url=endpoint, access_key="AKIDTEST", secret_key=SECRET).client.create_bucket(Bucket="tyr")
    yield endpoint
    server.stop()


def _store(endpoint, run="r1", **kw):
    return run_store("s3://tyr/base", run, endpoint_url=endpoint, access_key="AKIDTEST", secret_key=SECRET, **kw)


def test_commit_read_conditional_create_and_prefix(moto_endpoint, tmp_path):
    store = _store(moto_endpoint)
    commit_bytes(store, "iter-1/plan.json", b"{}", "h")
    assert read_verified(store, "iter-1/plan.json") == b"{}"
    assert not store.put_if_absent("iter-1/plan.json", b"other")
    assert store.list("iter-1/") == ["iter-1/plan.json", "iter-1/plan.json.manifest.json"]
    assert store.url == "s3://tyr/base/runs/r1/ at " + moto_endpoint and SECRET not in repr(store)
    big = tmp_path / "big.bin"
    big.write_bytes(random.randbytes(3 << 20))
    from tyr_core.store import commit_file

    commit_file(store, "final/model.safetensors", big, "h")
    assert fetch_verified(store, "final/model.safetensors", tmp_path / "dl").read_bytes() == big.read_bytes()


def test_corrupted_object_is_detected(moto_endpoint):
    store = _store(moto_endpoint, "r2")
    commit_bytes(store, "x.bin", b"payload", "h")
    store.put_bytes("x.bin", b"tampered")
    with pytest.raises(CorruptArtefactError, match="x.bin"):
        read_verified(store, "x.bin")


def test_injected_transient_faults_are_retried(moto_endpoint):
    store = _store(moto_endpoint, "r3", max_attempts=10)
    rng = random.Random(0)
    failures = []

    def flaky(request, **_):
        if rng.random() < 0.3:
            failures.append(request.url)
            raise EndpointConnectionError(endpoint_url=request.url)

    store.client.meta.events.register("before-send.s3", flaky)
    for i in range(20):
        commit_bytes(store, f"copies/{i}.bin", bytes([i]) * 1000, "h")
    store.client.meta.events.unregister("before-send.s3", flaky)
    assert failures  # faults did happen
    assert all(read_verified(store, f"copies/{i}.bin") == bytes([i]) * 1000 for i in range(20))


def test_clear_errors_never_show_credentials(moto_endpoint, caplog):
    caplog.set_level(logging.DEBUG)
    missing = S3Store("no-such-bucket", endpoint_url=moto_endpoint, access_key="AKIDTEST", secret_key=SECRET)
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist") as err:
        missing.put_bytes("k", b"x")
    assert SECRET not in str(err.value)
    closed = S3Store(
        "tyr",
        endpoint_url=f"http://127.0.0.1:{_port()}",
        access_key="AKIDTEST",
        secret_key=SECRET,
        connect_timeout=0.5,
        max_attempts=1,
    )
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint") as err:
        closed.get_bytes("k")
    assert SECRET not in str(err.value)
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    with pytest.raises(StoreError, match="unsupported scheme"):
        open_store("ftp://host/x")
    with pytest.raises(StoreError, match="run id"):
        run_store("s3://tyr", "../escape", endpoint_url=moto_endpoint)


@pytest.mark.slow
def test_seaweedfs_conditional_writes_and_verified_commits(tmp_path, monkeypatch):
    from tasks.seaweed import EmbeddedSeaweed

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "any")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "any")
    with EmbeddedSeaweed(tmp_path / "weed") as s3:
        store = run_store(s3.store_url, "r", endpoint_url=s3.endpoint_url)
        commit_bytes(store, "a.json", b"[1]", "h")
        assert not store.put_if_absent("a.json", b"[2]")
        assert read_verified(store, "a.json") == b"[1]"
        store.put_bytes("a.json", b"[3]")
        with pytest.raises(CorruptArtefactError):
            read_verified(store, "a.json")
