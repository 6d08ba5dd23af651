"""The S3 store against moto (in-process server, fast) and a real SeaweedFS (``slow``): the Store contract,
conditional creates, the commit protocol under injected faults, error messages that say what to do, URL
parsing, and credentials that never show up in messages, logs, ``repr`` or ``url``."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import socket
import time
import traceback
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ResponseStreamingError
from botocore.httpsession import URLLib3Session
from botocore.retries.standard import ExponentialBackoff
from moto.server import ThreadedMotoServer

from tyr_core import keys
from tyr_core.errors import (
    ArtefactError,
    ConfigError,
    CorruptArtefactError,
    InvalidKeyError,
    MissingArtefactError,
    NoSuchBucketError,
    StoreCredentialsError,
    StoreError,
    StoreUnreachableError,
)
from tyr_core.store import (
    FileStore,
    collect_garbage,
    commit_bytes,
    commit_file,
    fetch_verified,
    is_committed,
    read_manifest,
    read_verified,
)
from tyr_runtime.s3 import S3Store
from tyr_runtime.seaweed import EmbeddedSeaweed
from tyr_runtime.storage import check_store, open_store, run_store

ACCESS = "AKIATYRTESTACCESS001"
SECRET = "tyr-test-SECRET-must-never-leak-0123456789"
PART = 5 << 20  # S3's smallest multipart part


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def make_store(endpoint: str, bucket: str, prefix: str = "base/run", **options) -> S3Store:
    defaults = dict(
        endpoint_url=endpoint,
        access_key=ACCESS,
        secret_key=SECRET,
        region="us-east-1",
        max_attempts=5,
        connect_timeout=2,
        read_timeout=30,
        multipart_threshold=PART,
        multipart_chunksize=PART,
    )
    return S3Store(bucket, prefix, **{**defaults, **options})


@pytest.fixture
def s3(moto_endpoint) -> S3Store:
    store = make_store(moto_endpoint, f"tyr-{uuid.uuid4().hex[:12]}")
    store.create_bucket()
    return store


@pytest.fixture
def fast_retries(monkeypatch):
    """botocore waits up to seconds between attempts; the retry logic, not the waiting, is under test."""
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.002)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text


def full_text(err: BaseException) -> str:
    return "".join(traceback.format_exception(err))


# ----------------------------------------------------------------------------------------- shared checks


def check_store_contract(store: S3Store, tmp_path: Path) -> None:
    store.put_bytes("a/b.bin", b"12345")
    assert store.get_bytes("a/b.bin") == b"12345" and store.exists("a/b.bin") and store.size("a/b.bin") == 5
    assert not store.exists("a/missing") and not store.exists("a")
    with pytest.raises(MissingArtefactError, match="'a/missing' is not in s3://"):
        store.get_bytes("a/missing")
    with pytest.raises(MissingArtefactError):
        store.size("a/missing")
    with pytest.raises(MissingArtefactError):
        store.get_file("a/missing", tmp_path / "missing")
    assert store.put_if_absent("a/once.json", b"first") and not store.put_if_absent("a/once.json", b"second")
    assert store.get_bytes("a/once.json") == b"first"
    store.put_bytes("a10/c.bin", b"c")
    assert store.list("a/") == ["a/b.bin", "a/once.json"] and store.list("a") == ["a/b.bin", "a/once.json", "a10/c.bin"]
    assert store.list("nothing/") == []
    store.delete("a10/c.bin")
    store.delete("a10/c.bin")  # idempotent
    assert store.list("a1") == []
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * PART + 123))  # multipart: three parts
    store.put_file("files/big.bin", big)
    store.get_file("files/big.bin", tmp_path / "dl" / "big.bin")
    assert (tmp_path / "dl" / "big.bin").read_bytes() == big.read_bytes() and store.size(
        "files/big.bin"
    ) == 2 * PART + 123


def check_commit_protocol(store: S3Store, tmp_path: Path) -> None:
    m = commit_bytes(store, "iter-1/plan.json", b'{"a": 1}', "cfg", meta={"why": "test"})
    assert read_verified(store, "iter-1/plan.json") == b'{"a": 1}' and is_committed(store, "iter-1/plan.json")
    assert commit_bytes(store, "iter-1/plan.json", b'{"a": 1}', "cfg") == m
    with pytest.raises(ArtefactError, match="already committed with other bytes"):
        commit_bytes(store, "iter-1/plan.json", b'{"a": 2}', "cfg")
    src = tmp_path / "copy.safetensors"
    src.write_bytes(os.urandom(PART + 77))
    key = keys.copy_key(1, 0, "mlp", 0)
    commit_file(store, key, src, "cfg")
    assert fetch_verified(store, key, tmp_path / "cache" / "copy").read_bytes() == src.read_bytes()
    store.put_bytes(read_manifest(store, key).stored_at, b"bit rot")  # the object changes behind its manifest
    with pytest.raises(CorruptArtefactError, match=re.escape(f"'{key}'") + ".*corrupt"):
        read_verified(store, key)
    with pytest.raises(CorruptArtefactError):
        fetch_verified(store, key, tmp_path / "cache" / "fresh")
    assert not (tmp_path / "cache" / "fresh").exists()
    commit_bytes(store, keys.result_key(2), b"{}", "cfg")
    assert collect_garbage(store, 2).keys_deleted == 2  # the copy and its manifest
    assert not store.list("iter-1/supernet/") and read_verified(store, "iter-1/plan.json")


class _Body:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_):
        yield self.body


class FaultInjector:
    """A ``before-send`` hook that fails a fraction of requests: refused connections, 500s, 503 SlowDowns, and
    'lost responses' (the server does the work, the client sees a dropped connection and retries).

    Only a request's first two attempts are ever failed, so with ``max_attempts >= 3`` every request can
    succeed whatever the thread interleaving; lost responses are only made for single-shot operations.
    """

    LOSABLE = {"PutObject", "GetObject", "HeadObject", "DeleteObject", "ListObjectsV2"}

    def __init__(self, rate: float, seed: int = 0):
        self.rng, self.rate, self.counts = random.Random(seed), rate, Counter()
        self.http = URLLib3Session(timeout=30)

    def __call__(self, request, event_name: str, **_):
        operation = event_name.rsplit(".", 1)[-1]
        if _attempt(request) > 2 or self.rng.random() >= self.rate:
            return None
        kind = self.rng.choice(["refused", "500", "503"] + (["lost"] if operation in self.LOSABLE else []))
        self.counts[kind] += 1
        if kind == "refused":
            raise EndpointConnectionError(endpoint_url=request.url)
        if kind == "lost":
            _ = self.http.send(request).content
            raise ConnectionClosedError(endpoint_url=request.url)
        code = "InternalError" if kind == "500" else "SlowDown"
        body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
        return AWSResponse(request.url, int(kind), {}, _Body(body))


def _attempt(request) -> int:
    """The attempt number botocore sends: ``attempt=2; max=5``, led by ``ttl=...;`` after a real response."""
    header = request.headers.get("amz-sdk-request", b"attempt=1")
    text = header.decode() if isinstance(header, bytes) else header
    fields = dict(part.strip().split("=", 1) for part in text.split(";"))
    return int(fields["attempt"])


def check_commits_survive_faults(store: S3Store, tmp_path: Path) -> Counter:
    faults = FaultInjector(rate=0.3, seed=7)
    store.client.meta.events.register_first("before-send.s3", faults)
    payloads = {f"iter-1/stats/layer-{i}.safetensors": os.urandom(2000) + bytes([i]) for i in range(30)}
    for key, data in payloads.items():
        commit_bytes(store, key, data, "cfg")
    files = []
    for i in range(2):
        path = tmp_path / f"copy-{i}.bin"
        path.write_bytes(os.urandom(PART + 1000 * i))
        files.append((keys.copy_key(1, i, "attn", 0), path))
        commit_file(store, files[-1][0], path, "cfg")
    for key, data in payloads.items():  # every commit happened exactly once, and reads back verified
        assert read_verified(store, key) == data
    for key, path in files:
        assert fetch_verified(store, key, tmp_path / "dl" / key).read_bytes() == path.read_bytes()
    store.client.meta.events.unregister("before-send.s3", faults)
    assert all(faults.counts[k] > 0 for k in ("refused", "500", "503", "lost")), faults.counts
    return faults.counts


# ---------------------------------------------------------------------------------------------- moto tests


def test_store_contract_on_moto(s3, tmp_path):
    check_store_contract(s3, tmp_path)


def test_commit_protocol_on_moto(s3, tmp_path):
    check_commit_protocol(s3, tmp_path)


def test_commits_complete_and_verify_under_injected_faults(s3, tmp_path, fast_retries):
    check_commits_survive_faults(s3, tmp_path)


def test_keys_and_deletes_are_confined_to_the_prefix(s3):
    neighbour = S3Store(s3.bucket, "base/other", endpoint_url=s3.endpoint_url, access_key=ACCESS, secret_key=SECRET)
    neighbour.put_bytes("x.bin", b"not yours")
    s3.put_bytes("mine.bin", b"mine")
    assert s3.list("") == ["mine.bin"] and neighbour.list("") == ["x.bin"]
    for key in ("../other/x.bin", "/base/other/x.bin", "a/../../other/x.bin", "..\\other\\x.bin", ""):
        with pytest.raises(InvalidKeyError):
            s3.delete(key)
        with pytest.raises(InvalidKeyError):
            s3.put_bytes(key, b"overwrite")
    with pytest.raises(InvalidKeyError):
        s3.list("../")
    assert neighbour.get_bytes("x.bin") == b"not yours"


def test_a_conditional_create_conflict_409_is_retried(s3, fast_retries):
    conflicts = []

    def conflict_once(request, **_):
        if request.headers.get("If-None-Match") and not conflicts:
            conflicts.append(request.url)
            body = b"<Error><Code>ConditionalRequestConflict</Code><Message>in flight</Message></Error>"
            return AWSResponse(request.url, 409, {}, _Body(body))
        return None

    s3.client.meta.events.register_first("before-send.s3.PutObject", conflict_once)
    assert s3.put_if_absent("lock.json", b"me") and conflicts and s3.get_bytes("lock.json") == b"me"
    assert not s3.put_if_absent("lock.json", b"someone else")


def test_a_persistent_409_gives_up_with_a_store_error(s3, fast_retries):
    def always_conflict(request, **_):
        body = b"<Error><Code>ConditionalRequestConflict</Code><Message>in flight</Message></Error>"
        return AWSResponse(request.url, 409, {}, _Body(body))

    s3.client.meta.events.register_first("before-send.s3.PutObject", always_conflict)
    with pytest.raises(StoreError, match="ConditionalRequestConflict"):
        s3.put_if_absent("lock.json", b"me")


def test_a_server_failure_that_outlives_retries_points_at_its_log(s3, fast_retries):
    def always_fail(request, **_):
        body = b"<Error><Code>InternalError</Code><Message>We encountered an internal error</Message></Error>"
        return AWSResponse(request.url, 500, {}, _Body(body))

    s3.client.meta.events.register_first("before-send.s3.PutObject", always_fail)
    with pytest.raises(StoreError, match=r"write 'k.bin'.*HTTP 500.*see its log .*under 1% free"):
        s3.put_bytes("k.bin", b"x")


def test_the_retry_header_is_read_with_or_without_its_ttl():
    class Request:
        def __init__(self, header):
            self.headers = {"amz-sdk-request": header}

    assert _attempt(Request(b"attempt=1; max=5")) == 1
    assert _attempt(Request("ttl=20261202T002318Z; attempt=3; max=5")) == 3


def test_embedded_seaweed_refuses_a_disk_too_full_to_write(tmp_path, monkeypatch):
    gib = 2**30
    nearly_full = type(shutil.disk_usage(tmp_path))(total=200 * gib, used=198 * gib, free=2 * gib)
    monkeypatch.setattr("tyr_runtime.seaweed_host.shutil.disk_usage", lambda path: nearly_full)
    server = EmbeddedSeaweed(tmp_path / "weed")
    with pytest.raises(StoreError, match=r"weed is on a disk with 2.00 GiB free of 200.00 GiB.*Free at least 0.25 GiB"):
        server.start()
    assert server.proc is None and server._lock is None  # nothing was started, nothing is held


def test_a_body_that_breaks_mid_stream_is_read_again(s3):
    s3.put_bytes("k.bin", b"payload")
    broken = []

    def break_first_body(parsed, **_):
        if not broken:
            broken.append(True)

            class Broken:
                def read(self, *a):
                    raise ResponseStreamingError(error="injected")

            parsed["Body"] = Broken()

    s3.client.meta.events.register("after-call.s3.GetObject", break_first_body)
    assert s3.get_bytes("k.bin") == b"payload" and broken


def test_an_unreachable_endpoint_says_to_start_the_server(caplog, fast_retries):
    port = closed_port()
    store = make_store(f"http://127.0.0.1:{port}", "tyr", connect_timeout=0.5, max_attempts=2)
    caplog.set_level(logging.DEBUG)
    sent = []
    store.client.meta.events.register("before-send.s3", lambda **_: sent.append(1))
    for op in (
        lambda: store.put_bytes("k", b"x"),
        lambda: check_store(store),
        lambda: commit_bytes(store, "k", b"x", "c"),
    ):
        sent.clear()
        with pytest.raises(StoreUnreachableError, match=f"127.0.0.1:{port}.*start the server or fix endpoint_url") as e:
            op()
        assert_no_secret(full_text(e.value))
        assert 1 <= len(sent) <= 2 * store.max_attempts  # it gives up instead of retrying for ever
    assert_no_secret(caplog.text)


def test_a_missing_bucket_is_named(moto_endpoint, tmp_path):
    store = make_store(moto_endpoint, "tyr-no-such-bucket")
    for op in (
        lambda: store.put_bytes("k", b"x"),
        lambda: store.get_bytes("k"),
        lambda: store.list(""),
        lambda: check_store(store),
    ):
        with pytest.raises(NoSuchBucketError, match="bucket 'tyr-no-such-bucket' does not exist.*create it"):
            op()
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 100)
    with pytest.raises(NoSuchBucketError):
        store.put_file("f.bin", src)


@contextmanager
def moto_authentication(endpoint: str) -> Iterator[None]:
    """moto checks signatures and IAM policies only when told to (its /moto-api/reset-auth switch)."""

    def switch(count: bytes) -> None:
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth", data=count, method="POST", headers={"Content-Type": "text/plain"}
        )
        urllib.request.urlopen(request).close()

    switch(b"0")
    try:
        yield
    finally:
        switch(b"inf")


def test_rejected_credentials_are_reported_without_leaking_them(s3, moto_endpoint, caplog):
    iam = boto3.client(
        "iam", endpoint_url=moto_endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
    )
    user = f"u{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    real = iam.create_access_key(UserName=user)["AccessKey"]
    caplog.set_level(logging.DEBUG)
    cases = [
        (ACCESS, SECRET, "rejected \\(InvalidAccessKeyId\\)"),
        (real["AccessKeyId"], SECRET, "rejected \\(SignatureDoesNotMatch\\)"),
        (real["AccessKeyId"], real["SecretAccessKey"], "access denied \\(AccessDenied\\)"),  # no policy attached
    ]
    with moto_authentication(moto_endpoint):
        for access, secret, expected in cases:
            store = make_store(moto_endpoint, s3.bucket, access_key=access, secret_key=secret, max_attempts=1)
            with pytest.raises(StoreCredentialsError, match=expected) as info:
                store.put_bytes("k", b"x")
            with pytest.raises(StoreCredentialsError):
                check_store(store)
            text = full_text(info.value) + repr(store) + store.url
            assert secret not in text and access not in str(info.value)
    assert SECRET not in caplog.text and real["SecretAccessKey"] not in caplog.text


def test_missing_credentials_say_where_to_put_them(moto_endpoint, monkeypatch, tmp_path):
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups
    store = S3Store("tyr", "p", endpoint_url=moto_endpoint, region="us-east-1", max_attempts=1)
    with pytest.raises(StoreCredentialsError, match="no usable S3 credentials.*AWS_ACCESS_KEY_ID"):
        store.get_bytes("k")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)  # the standard chain, read when the store is made
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    chained = run_store("s3://tyr-chain/base", "r1", moto_endpoint, region="us-east-1")
    chained.create_bucket()
    commit_bytes(chained, "a.json", b"{}", "cfg")
    assert read_verified(chained, "a.json") == b"{}"


def test_secrets_never_appear_in_repr_url_or_logs(s3, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    check_commit_protocol(s3, tmp_path)
    assert_no_secret(repr(s3), s3.url, caplog.text, str(vars(s3).get("prefix")))
    assert ACCESS not in repr(s3) + s3.url
    hidden = S3Store("tyr", endpoint_url="http://user:pw-SECRET@127.0.0.1:9", access_key="a", secret_key="b")
    assert "pw-SECRET" not in repr(hidden) + hidden.url + hidden.endpoint


def test_check_store_passes_and_cleans_up(s3):
    check_store(s3)
    assert s3.list("") == []


def test_check_store_refuses_a_server_that_ignores_conditional_writes(s3):
    def drop_condition(params, **_):
        params.pop("IfNoneMatch", None)

    s3.client.meta.events.register("before-parameter-build.s3.PutObject", drop_condition)
    with pytest.raises(StoreError, match="ignores conditional writes"):
        check_store(s3)
    assert s3.list("") == []  # the probe key was removed


def test_open_store_by_url(moto_endpoint, tmp_path):
    store = open_store("s3://tyr-bucket/some/prefix/", moto_endpoint, access_key=ACCESS, secret_key=SECRET)
    assert isinstance(store, S3Store) and store.bucket == "tyr-bucket" and store.url == "s3://tyr-bucket/some/prefix/"
    assert open_store("s3://tyr-bucket", moto_endpoint, access_key=ACCESS, secret_key=SECRET).url == "s3://tyr-bucket/"
    assert open_store(tmp_path.as_uri()).root == tmp_path.resolve()
    assert open_store(str(tmp_path / "plain")).root == (tmp_path / "plain").resolve()
    assert open_store(f"file://{tmp_path}/with%20space").root == (tmp_path / "with space").resolve()
    for url in ("http://host/x", "gs://bucket/x", "ftp://x"):
        with pytest.raises(ConfigError, match=f"{url}.*unsupported scheme.*s3://BUCKET/PREFIX"):
            open_store(url)
    for url in ("", "file://host/x", "file:relative", "s3://", "s3://b/x?y=1", "s3://u:p@bkt/x", "s3://bkt/a/../b"):
        with pytest.raises(ConfigError):
            open_store(url)


def test_run_store_scopes_to_the_run(moto_endpoint, tmp_path):
    s3 = run_store("s3://tyr-bucket/base", "run-1_a.b", moto_endpoint, access_key=ACCESS, secret_key=SECRET)
    assert s3.url == "s3://tyr-bucket/base/runs/run-1_a.b/"
    local = run_store(str(tmp_path), "r1")
    assert isinstance(local, FileStore) and local.root == (tmp_path / "runs" / "r1").resolve()
    for bad in ("", "a/b", "..", ".hidden", "a b", "x" * 129, "-lead"):
        with pytest.raises(ConfigError, match="invalid run id"):
            run_store(str(tmp_path), bad)


# -------------------------------------------------------------------------------------- SeaweedFS (slow)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> Iterator[EmbeddedSeaweed]:
    with EmbeddedSeaweed(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def weed_store(seaweed) -> S3Store:
    return seaweed.open_store(
        f"tests/{uuid.uuid4().hex[:12]}", multipart_threshold=PART, multipart_chunksize=PART, max_attempts=5
    )


@pytest.mark.slow
def test_seaweed_conditional_write_returns_false_on_an_existing_key(weed_store):
    assert weed_store.put_if_absent("m.json", b"first")
    assert not weed_store.put_if_absent("m.json", b"second")
    assert weed_store.get_bytes("m.json") == b"first"
    check_store(weed_store)


@pytest.mark.slow
def test_seaweed_store_contract(weed_store, tmp_path):
    check_store_contract(weed_store, tmp_path)


@pytest.mark.slow
def test_seaweed_commit_round_trip_and_corruption(weed_store, tmp_path):
    check_commit_protocol(weed_store, tmp_path)


@pytest.mark.slow
def test_seaweed_commits_survive_injected_faults(weed_store, tmp_path, fast_retries):
    check_commits_survive_faults(weed_store, tmp_path)


@pytest.mark.slow
def test_seaweed_with_credentials_rejects_wrong_ones(tmp_path, caplog):
    with EmbeddedSeaweed(tmp_path / "weed", access_key=ACCESS, secret_key=SECRET) as server:
        good = server.open_store("p")
        check_store(good)
        caplog.set_level(logging.DEBUG)
        wrong = "wrong-" + SECRET[::-1]
        for access, secret, code in ((ACCESS, wrong, "SignatureDoesNotMatch"), ("nobody", wrong, "InvalidAccessKeyId")):
            bad = S3Store(server.bucket, "p", endpoint_url=server.endpoint_url, access_key=access, secret_key=secret)
            with pytest.raises(StoreCredentialsError, match=code) as info:
                bad.put_bytes("k", b"x")
            assert secret not in full_text(info.value)
        assert_no_secret(caplog.text)


@pytest.mark.slow
def test_embedded_seaweed_lifecycle(tmp_path):
    data = tmp_path / "weed"
    server = EmbeddedSeaweed(data).start()
    pid, sockets = server.proc.pid, server._sockets
    commit_bytes(server.open_store("r"), "x.json", b"{}", "cfg")
    with EmbeddedSeaweed(data) as second:  # one server per data folder: a second user shares it
        assert second.joined and second.endpoint_url == server.endpoint_url
    assert server.proc.poll() is None  # the second user leaving does not stop the first one's server
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone: no orphans
    assert not sockets.exists() and not list(Path("/tmp").glob(f"seaweedfs-s3-{server.ports['s3.port']}.sock"))
    ports = [*server.ports.values(), server.ports["admin.port"] + 10000]  # the admin's gRPC port
    assert not [p for port in ports for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")]  # nor its gRPC sockets
    assert not list(Path("/tmp").glob(f"weed.*.{pid}"))  # its glog files went to the data folder
    with EmbeddedSeaweed(data) as again:  # data persists across restarts
        assert read_verified(again.open_store("r"), "x.json") == b"{}"
        saved = json.loads((data / "tyr-ports.json").read_text())
        assert saved["s3.port"] == again.ports["s3.port"]


@pytest.mark.slow
def test_embedded_seaweed_failing_to_start_shows_its_log(tmp_path):
    with socket.socket() as taken:  # bound, not listening: weed cannot have the port, and nothing answers there
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        server = EmbeddedSeaweed(tmp_path / "weed", port=port, startup_timeout=30)
        if server.private_network():  # weed listens in a network of its own: tyr's S3 relay is what cannot bind
            with pytest.raises(StoreError, match=f"could not listen at http://127.0.0.1:{port} .*in use"):
                server.start()
        else:
            with pytest.raises(StoreError, match=f"SeaweedFS exited with status .* at http://127.0.0.1:{port}") as info:
                server.start()
            assert f"port {port}" in str(info.value).split("ends with:")[1]  # the tail of its own log says why
    assert server.proc is None and server._lock is None


@pytest.mark.slow
def test_embedded_seaweed_refuses_unauthenticated_requests_and_keeps_its_files_private(tmp_path):
    data = tmp_path / "weed"
    with EmbeddedSeaweed(data) as server:
        commit_bytes(server.open_store("r"), "x.json", b"{}", "cfg")
        for request in (
            urllib.request.Request(f"{server.endpoint_url}/tyr/r/x.json"),
            urllib.request.Request(f"{server.endpoint_url}/tyr/r/x.json", data=b"evil", method="PUT"),
            urllib.request.Request(f"{server.endpoint_url}/tyr?list-type=2"),
        ):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 403
        other = S3Store("tyr", "r", endpoint_url=server.endpoint_url, access_key="tyr-embedded", secret_key="x")
        with pytest.raises(StoreCredentialsError):
            other.get_bytes("x.json")  # the old anonymous pair no longer works
        assert read_verified(server.open_store("r"), "x.json") == b"{}"
        creds = json.loads(server.credentials_file.read_text())
        assert server.client_options() == creds and len(creds["secret_key"]) >= 32
        assert server.credentials_file.stat().st_mode & 0o777 == 0o600
        assert data.stat().st_mode & 0o777 == 0o700 and server._sockets.stat().st_mode & 0o777 == 0o700
        grpc_ports = [p for f, p in server.ports.items() if f.endswith(".grpc")]
        sockets = [p for port in grpc_ports for p in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock")]
        assert sockets and all(p.stat().st_mode & 0o077 == 0 for p in sockets)  # weed's fixed /tmp names: ours only
    with EmbeddedSeaweed(data) as again:  # the same pair next time
        assert again.client_options() == creds


_OWNER = """
import sys, time
import tyr_runtime.seaweed as sw
if sys.argv[2] == "orphan":  # as if the death signal were unavailable (not Linux): the pid file must do
    sw.child_setup = lambda parent: (lambda: None)
if sys.argv[2] == "no-pid-file":  # killed after its server answered, before it wrote the pid file
    import os, signal
    sw.EmbeddedSeaweed._save_pid = lambda self: (print(self.proc.pid, flush=True), os.kill(os.getpid(), signal.SIGKILL))
server = sw.EmbeddedSeaweed(sys.argv[1]).start()
print(server.proc.pid, flush=True)
time.sleep(600)
"""


def _wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True  # a zombie: dead, waiting to be reaped by init
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["death-signal", "orphan"])
def test_an_embedded_seaweed_never_outlives_a_killed_owner_unnoticed(tmp_path, mode):
    """The owner is SIGKILLed: the server dies with it (Linux), and where it could not, the next start stops it
    through its pid file (it has no live user left) instead of dying on the data folder's locks."""
    import subprocess
    import sys

    data = tmp_path / "weed"
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(data), mode], stdout=subprocess.PIPE, text=True)
    try:
        weed_pid = int(owner.stdout.readline())
        with EmbeddedSeaweed(data) as first:  # while its owner lived, the server was used, not taken from it
            assert first.joined and first._joined_pid == weed_pid
    finally:
        owner.kill()
        owner.wait()
    if mode == "death-signal":
        assert _wait_gone(weed_pid)
    with EmbeddedSeaweed(data) as server:  # starts, whichever way the old server went
        commit_bytes(server.open_store("r"), "y.json", b"{}", "cfg")
        assert read_verified(server.open_store("r"), "y.json") == b"{}"
    assert _wait_gone(weed_pid, timeout=1)


@pytest.mark.slow
def test_an_embedded_seaweed_started_from_a_thread_outlives_that_thread(tmp_path):
    """Linux's death signal follows the thread that forked the child: a store started from a task runner's thread
    must keep serving after that thread ends, and still die with the process."""
    import threading

    started: list[EmbeddedSeaweed] = []
    starter = threading.Thread(target=lambda: started.append(EmbeddedSeaweed(tmp_path / "weed").start()))
    starter.start()
    starter.join()
    server = started[0]
    try:
        time.sleep(2)  # the death signal, if armed by the ended thread, has been delivered by now
        assert server.proc.poll() is None and (server._relay is None or server._relay.poll() is None)
        commit_bytes(server.open_store("r"), "t.json", b"{}", "cfg")
        assert read_verified(server.open_store("r"), "t.json") == b"{}"
    finally:
        server.stop()


@pytest.mark.slow
def test_a_server_whose_owner_died_before_writing_its_pid_file_never_blocks_the_next_start(tmp_path):
    """The next start finds the dying (or orphaned) server by its command line and waits for it, instead of
    starting beside it and exiting on SeaweedFS's own lock of the data folder."""
    import subprocess
    import sys

    data = tmp_path / "weed"
    command = [sys.executable, "-c", _OWNER, str(data), "no-pid-file"]
    owner = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    weed_pid = int(owner.stdout.readline())
    owner.wait()
    assert not (data / "tyr-weed.pid.json").exists()
    with EmbeddedSeaweed(data) as server:  # at once: the old server may still be shutting down
        commit_bytes(server.open_store("r"), "z.json", b"{}", "cfg")
        assert read_verified(server.open_store("r"), "z.json") == b"{}"
    assert _wait_gone(weed_pid, timeout=1)


def test_gc_of_one_run_leaves_a_sibling_whose_id_it_prefixes(s3):
    """``runs/r1`` and ``runs/r10`` share a string prefix on S3: GC of r1 lists ``runs/r1/``, never ``runs/r1``."""
    r1, r10 = s3.scoped("runs/r1"), s3.scoped("runs/r10")
    for run in (r1, r10):
        for it in (1, 2):
            commit_bytes(run, keys.copy_key(it, 0, "attn", 0), b"copy", "cfg")
            commit_bytes(run, keys.stats_key(it, 0), b"stats", "cfg")
    commit_bytes(r1, keys.result_key(2), b"{}", "cfg")
    sibling = r10.list("")
    assert collect_garbage(r1, 2).iterations == (1,)
    assert r1.list(keys.supernet_prefix(1)) == [] and r1.list(keys.stats_prefix(1)) == []
    assert r10.list("") == sibling and read_verified(r10, keys.copy_key(1, 0, "attn", 0)) == b"copy"


def test_copies_from_a_store_are_their_owners_only(s3, tmp_path, monkeypatch):
    """The workspace cache and ``out/RUN_ID`` hold calibration text and weights: private under a umask of 022."""
    from tyr_cli.prune import deliver_exports
    from tyr_runtime import workspace as ws_module
    from tyr_runtime.workspace import RunRef, workspace

    old = os.umask(0o022)
    try:
        folder = FileStore(tmp_path / "store")
        for store in (s3, folder):
            commit_bytes(store, "calibration/tokens.safetensors", b"calibration text", "cfg")
            path = fetch_verified(store, "calibration/tokens.safetensors", tmp_path / "dl" / store.url[:2] / "a" / "t")
            assert path.stat().st_mode & 0o777 == 0o600
            assert all((tmp_path / "dl" / store.url[:2] / sub).stat().st_mode & 0o777 == 0o700 for sub in ("", "a"))

        commit_bytes(s3, keys.export_marker_key("masked"), json.dumps({"files": ["model.safetensors"]}).encode(), "c")
        commit_bytes(s3, keys.export_prefix("masked") + "model.safetensors", b"weights", "cfg")
        monkeypatch.chdir(tmp_path)
        copied = deliver_exports(s3, [{"format": "masked", "files": ["model.safetensors"]}], Path("out") / "r1")
        assert (copied["masked"] / "model.safetensors").stat().st_mode & 0o777 == 0o600
        assert all((tmp_path / p).stat().st_mode & 0o777 == 0o700 for p in ("out", "out/r1", "out/r1/masked"))

        monkeypatch.setenv("TYR_CACHE", str(tmp_path / "cache"))
        ref = RunRef(run_id="r1", store_url=f"file://{tmp_path / 'runs-store'}")
        stale = ws_module.default_cache_dir() / "runs" / ws_module._location_tag(ref) / "r1"
        stale.mkdir(parents=True)  # a cache left by an earlier version, world-readable
        from flows.recipes import resolve_config

        config = resolve_config("tiny-test")
        body = {"run_id": "r1", "config": config.model_dump(mode="json"), "artefact_hash": config.artefact_hash()}
        commit_bytes(run_store(ref.store_url, "r1"), keys.RUN_CONFIG, json.dumps(body).encode(), "cfg")
        assert workspace(ref).cache.stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(old)
        ws_module._WORKSPACES.clear()
