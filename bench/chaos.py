"""Chaos on the tiny preset, with the embedded SeaweedFS and a real Prefect server; prints JSON.

    python bench/chaos.py [--kills 20] [--fault-kills 3] [--fault-rate 0.05] [--seed 0] [--attacks-only]

1. reference: one uninterrupted run; its committed artefacts (sha256 of every manifest but run.json) are the goal.
2. kills: ``tyr prune`` SIGKILLed with its whole process group (CLI, embedded SeaweedFS) at random moments, each
   followed by the same command again (a resume), then a last resume to the end. After every kill the committed
   manifests are read: none may change or disappear later (nothing committed is recomputed).
3. faults: the same with a share of S3 requests failing (refused connections, read timeouts, 503s, responses lost
   after the server acted), injected by a botocore hook in the run's process.
4. two drivers started together on one run id (one ``tyr store serve`` for both): exactly one proceeds.
5. the store server SIGKILLed mid-run and restarted: the run (resumed if it failed) ends with the reference.
6. a corrupted object: found by a verification pass, deleted with its manifest, recomputed by a resume.
7. bad inputs (configs, models, stores, run ids, keys): each refused with its message.
8. attacks (alone with ``--attacks-only``, seconds): result records naming pickle or another decoder, every embedded
   SeaweedFS port without credentials, deployment parameters outside the method's settings, hostile config.json
   sizes, a decoy safetensors beside a pickle, a run id with a newline, a run folder that is a symbolic link, writes
   beside the run's driver (a stalled lock holder, a taker whose clock runs ahead, a replica of a driver that lost
   the lock); counted as tried, refused and succeeded (the goal is 0).
Every run's output, the Prefect server's database and logs are searched for the store secrets.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RUN = "chaos"


# ------------------------------------------------------------------------------------------ the run's process


def child(rate: float, faults_file: str, argv: list[str]) -> int:
    """``tyr`` with a fault-injecting hook on every S3 client of this process."""
    from botocore.awsrequest import AWSResponse
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
    from botocore.httpsession import URLLib3Session

    import tyr_runtime.s3 as s3
    from tyr_cli.main import main

    rng, http = random.Random(os.getpid()), URLLib3Session(timeout=30)

    class Body:
        def __init__(self, body: bytes):
            self.body = body

        def stream(self, **_):
            yield self.body

    def inject(request, event_name: str, **_):
        header = request.headers.get("amz-sdk-request", b"attempt=1")
        text = header.decode() if isinstance(header, bytes) else header
        attempt = int(dict(p.strip().split("=", 1) for p in text.split(";"))["attempt"])
        if attempt > 2 or rng.random() >= rate:  # botocore retries up to 6 times: the third attempt goes through
            return None
        operation = event_name.rsplit(".", 1)[-1]
        kinds = ["refused", "timeout", "503"] + (["lost"] if operation in ("PutObject", "GetObject") else [])
        kind = rng.choice(kinds)
        with open(faults_file, "a") as f:
            f.write(f"{operation} {kind}\n")
        if kind == "refused":
            raise EndpointConnectionError(endpoint_url=request.url)
        if kind == "timeout":
            raise ReadTimeoutError(endpoint_url=request.url)
        if kind == "lost":  # the server acts, the client never hears
            _ = http.send(request).content
            raise ConnectionClosedError(endpoint_url=request.url)
        body = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
        return AWSResponse(request.url, 503, {}, Body(body))

    make = s3._make_client

    def faulty(*args, **kwargs):
        client = make(*args, **kwargs)
        client.meta.events.register("before-send.s3", inject)
        return client

    s3._make_client = faulty
    return main(argv)


# ------------------------------------------------------------------------------------------ helpers


class Chaos:
    def __init__(self, root: Path, api: str, seed: int):
        self.root, self.api, self.rng = root, api, random.Random(seed)
        self.outputs: list[str] = []
        self.secrets: list[str] = []

    def env(self, name: str, **extra: str) -> dict[str, str]:
        real = Path(os.environ.get("TYR_CACHE", Path.home() / ".cache" / "tyr"))
        cache = self.root / name / "cache"
        if not cache.exists():
            cache.mkdir(parents=True)
            for shared in ("models", "data"):
                (cache / shared).symlink_to(real / shared)
        drop = ("TYR_STORE_URL", "TYR_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        return env | {"TYR_CACHE": str(cache), "PREFECT_API_URL": self.api, "PYTHONPATH": str(REPO)} | extra

    def data(self, env: dict) -> Path:
        return Path(env["TYR_CACHE"]) / "seaweedfs"

    def prune(self, env: dict, rate: float = 0.0, faults: Path | None = None) -> subprocess.Popen:
        argv = ["prune", "tiny-test", "--run-id", RUN, "--json"]
        cmd = [sys.executable, str(Path(__file__)), "--child", str(rate), str(faults or os.devnull), "--", *argv]
        return subprocess.Popen(
            cmd,
            cwd=self.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def finish(self, proc: subprocess.Popen, timeout: float = 1200) -> tuple[int, str, str]:
        out, err = proc.communicate(timeout=timeout)
        self.outputs += [out, err]
        return proc.returncode, out, err

    def kill(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.finish(proc)

    def committed(self, env: dict | None = None, store=None) -> dict[str, tuple[str, float]]:
        """{key: (sha256, created)} of the run's committed artefacts but run.json."""
        from tyr_core import keys
        from tyr_runtime.seaweed import EmbeddedSeaweed

        def read(store) -> dict:
            found = {}
            for key in store.list(""):
                if keys.is_manifest(key) and keys.manifest_target(key) != keys.RUN_CONFIG:
                    m = json.loads(store.get_bytes(key))
                    found[m["key"]] = (m["sha256"], m["created"])
            return found

        if store is not None:
            return read(store)
        with EmbeddedSeaweed(self.data(env)) as server:
            self.note_secret(server)
            return read(server.open_store(keys.run_prefix(RUN)))

    def note_secret(self, server) -> None:
        secret = server.client_options()["secret_key"]
        if secret not in self.secrets:
            self.secrets.append(secret)


def shas(committed: dict) -> dict[str, str]:
    return {k: v[0] for k, v in committed.items()}


def lost_against(reference: dict, final: dict) -> int:
    return sum(1 for k, sha in shas(reference).items() if shas(final).get(k) != sha) + len(set(final) - set(reference))


def kill_chain(c: Chaos, name: str, kills: int, rate: float = 0.0) -> dict:
    """``kills`` SIGKILLs at random moments, each followed by a resume, then a resume to the end."""
    env = c.env(name)
    faults = c.root / name / "faults.txt"
    seen: dict[str, tuple[str, float]] = {}
    recomputed = survived = completed_early = 0
    for _ in range(kills):
        proc = c.prune(env, rate, faults)
        time.sleep(c.rng.uniform(1.0, 14.0))
        if proc.poll() is not None:
            completed_early += 1
            c.finish(proc)
        else:
            c.kill(proc)
        survived += 1
        now = c.committed(env)
        recomputed += sum(1 for k, v in seen.items() if now.get(k) != v)  # changed or gone since it was committed
        seen |= now
    code, out, err = c.finish(c.prune(env, rate, faults))
    final = c.committed(env)
    recomputed += sum(1 for k, v in seen.items() if final.get(k) != v)
    injected = len(faults.read_text().splitlines()) if faults.exists() else 0
    return {
        "kills": survived,
        "ended_by_itself_before_the_kill": completed_early,
        "final_exit": code,
        "final_error": err.strip().splitlines()[-1:] if code else [],
        "recomputed": recomputed,
        "faults_injected": injected,
        "final": final,
    }


def serve(c: Chaos, env: dict) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tyr_cli", "store", "serve", "--dir", str(c.data(env)), "--json"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines = []
    while not lines or lines[-1] != "}\n":
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(proc.stderr.read())
        lines.append(line)
    info = json.loads("".join(lines))
    creds = json.loads(Path(info["credentials_file"]).read_text())
    c.secrets.append(creds["secret_key"])
    store_env = env | {
        "TYR_STORE_URL": info["store_url"],
        "TYR_S3_ENDPOINT_URL": info["endpoint_url"],
        "AWS_ACCESS_KEY_ID": creds["access_key"],
        "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
    }
    return proc, store_env


def served_store(store_env: dict):
    from tyr_runtime.storage import run_store

    return run_store(
        store_env["TYR_STORE_URL"],
        RUN,
        endpoint_url=store_env["TYR_S3_ENDPOINT_URL"],
        access_key=store_env["AWS_ACCESS_KEY_ID"],
        secret_key=store_env["AWS_SECRET_ACCESS_KEY"],
    )


def two_drivers(c: Chaos, reference: dict) -> dict:
    env = c.env("two-drivers")
    server, store_env = serve(c, env)
    try:
        procs = [c.prune(store_env), c.prune(store_env)]
        results = [c.finish(p) for p in procs]
        codes = sorted(r[0] for r in results)
        refused = [r[2].strip().splitlines()[-1] for r in results if r[0] != 0]
        final = c.committed(store=served_store(store_env))
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.communicate(timeout=60)
    return {"exit_codes": codes, "refused_with": refused, "lost": lost_against(reference, final)}


def store_killed(c: Chaos, reference: dict) -> dict:
    env = c.env("store-killed")
    server, store_env = serve(c, env)
    run = c.prune(store_env)
    time.sleep(c.rng.uniform(6.0, 12.0))
    os.killpg(server.pid, signal.SIGKILL)  # the server, mid-write
    server.communicate()
    server, store_env = serve(c, env)  # restarted on the same data (and ports, if still free)
    try:
        code, _, err = c.finish(run)
        resumed = False
        if code != 0:
            resumed = True
            code, _, err = c.finish(c.prune(store_env))
        final = c.committed(store=served_store(store_env))
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.communicate(timeout=60)
    return {"exit": code, "resumed": resumed, "lost": lost_against(reference, final)}


def corrupt_and_recompute(c: Chaos, env: dict, reference: dict) -> dict:
    from tyr_core import keys
    from tyr_core.errors import CorruptArtefactError
    from tyr_core.store import read_manifest, read_verified, uncommit
    from tyr_runtime.seaweed import EmbeddedSeaweed

    victim = keys.calibration_key("tokens")
    with EmbeddedSeaweed(c.data(env)) as server:
        store = server.open_store(keys.run_prefix(RUN))
        store.put_bytes(read_manifest(store, victim).stored_at, b"bit rot")
        found = []
        for key in store.list(""):
            if keys.is_manifest(key):
                try:
                    read_verified(store, keys.manifest_target(key))
                except CorruptArtefactError as err:
                    found.append((keys.manifest_target(key), str(err)[:160]))
        for key, _ in found:
            uncommit(store, key)  # what the message says to do
    code, _, err = c.finish(c.prune(env))
    final = c.committed(env)
    return {
        "detected": [k for k, _ in found],
        "message": found[0][1] if found else "",
        "resume_exit": code,
        "recomputed_equal": final.get(victim, ("",))[0] == reference[victim][0],
        "lost": lost_against(reference, final),
    }


def bad_inputs(c: Chaos) -> list[dict]:
    """Each refused with its message (exit 2 from the CLI; the library's error for keys and stores)."""
    from tyr_cli.main import main
    from tyr_core.store import FileStore
    from tyr_runtime.s3 import S3Store
    from tyr_runtime.storage import open_store

    work = c.root / "bad"
    work.mkdir()
    store = f"file://{work / 'store'}"
    (work / "pickled").mkdir()
    (work / "pickled" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["Llama"]}))
    (work / "pickled" / "pytorch_model.bin").write_bytes(b"pickle")
    (work / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    (work / "blank.txt").write_text("\n\n")
    (work / "bad.yaml").write_text("prune: [unclosed")
    cli = [
        ["prune", "no-such-model-xyz"],
        ["prune", "tiny-test", "--set", "prune.target_sparsity=1.5"],
        ["prune", "tiny-test", "--set", "prune.bogus=1"],
        ["prune", "tiny-test", "--set", "prune.iterations"],
        ["prune", "tiny-test", "--set", "prune.num_levels=4"],
        ["prune", "tiny-test", "--run-id", "a/b"],
        ["prune", "tiny-test", "--run-id", "../escape"],
        ["prune", "tiny-test", "--store", "ftp://host/x"],
        ["prune", "tiny-test", "--store", "s3://B"],
        ["prune", "tiny-test", "--store", "s3://AKIA:se/cret@bucket/p"],
        ["prune", "tiny-test", "--store", "s3://bucket/p", "--endpoint-url", "http://AKIA:se/cret@127.0.0.1:1"],
        ["prune", "tiny-test", "--store", store, "--set", f"model.source={work / 'missing'}"],
        ["prune", "tiny-test", "--store", store, "--set", f"model.source={work / 'pickled'}"],
        ["prune", "tiny-test", "--store", store, "--set", f"model.source={work / 'bad.gguf'}"],
        ["prune", "tiny-test", "--store", store, "--set", f"calibration.files=[{work / 'blank.txt'}]"],
        ["prune", str(work / "bad.yaml"), "--store", store],
        ["runs", "show", "no-such-run", "--store", store],
        ["export", "no-such-run", "--format", "compact", "--out", str(work / "o"), "--store", store],
    ]
    tried = []
    for argv in cli:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse
                code = exit_.code
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        tried.append({"input": " ".join(argv), "exit": code, "message": lines[-1][:200] if lines else ""})
    library = [
        ("key '../x'", lambda: FileStore(work / "s").put_bytes("../x", b"")),
        ("key '/abs'", lambda: FileStore(work / "s").get_bytes("/abs")),
        ("key '.tmp-x'", lambda: FileStore(work / "s").put_bytes("a/.tmp-x", b"")),
        ("bucket 'b'", lambda: S3Store("b", endpoint_url="http://127.0.0.1:1", access_key="a", secret_key="b")),
        ("store URL ''", lambda: open_store("")),
    ]
    for name, call in library:
        try:
            call()
            tried.append({"input": name, "exit": 0, "message": "accepted"})
        except Exception as err:
            tried.append({"input": name, "exit": type(err).__name__, "message": str(err)[:200]})
    return tried


def start_prefect(root: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(root / "prefect")}
    log = open(root / "prefect-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{api}/health", timeout=2)
            return proc, api
        time.sleep(1)
    raise RuntimeError("the Prefect server did not start")


def secrets_in(c: Chaos) -> int:
    found = 0
    haystacks = [text.encode() for text in c.outputs]
    haystacks += [p.read_bytes() for p in (c.root / "prefect").rglob("*") if p.is_file()]
    haystacks.append((c.root / "prefect-server.log").read_bytes())
    for secret in c.secrets:
        found += sum(h.count(secret.encode()) for h in haystacks)
    return found


def attack_figures(tried: list[dict]) -> dict:
    return {
        "attacks_tried": len(tried),
        "attacks_refused": sum(a["refused"] for a in tried),
        "attacks_succeeded": sum(not a["refused"] for a in tried),
    }


class _Planted:
    """Unpickling this leaves a marker file: the attack succeeded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def _attack(results: list[dict], name: str, attempt, succeeded=lambda: False) -> None:
    """Run ``attempt``; refused when it raises a TyrError (or returns False) and ``succeeded`` stays False."""
    from tyr_core.errors import TyrError

    try:
        outcome = attempt()
        refused = outcome is False
        detail = "" if refused else f"accepted: {str(outcome)[:120]}"
    except TyrError as err:
        refused, detail = True, f"{type(err).__name__}"
    except Exception as err:  # anything else is not a clean refusal
        refused, detail = False, f"failed as {type(err).__name__}: {str(err)[:120]}"
    if succeeded():
        refused, detail = False, "the attack's effect happened"
    results.append({"attack": name, "refused": refused, "detail": detail})


def attacks(root: Path) -> list[dict]:
    """The security attacks, each tried once in this process: planted result records, every embedded SeaweedFS
    port without credentials, deployment parameters outside the method, hostile model folders and store paths."""
    import base64
    import pickle
    import shutil
    import urllib.error
    import urllib.request

    from prefect._internal.result_records import ResultRecord

    import tasks.policies  # noqa: F401 - installs the result guard, as every tyr flow does
    from flows.recipes import resolve_config
    from tyr_core.families import geometry, load_config, resolve_model
    from tyr_runtime import safety
    from tyr_runtime.seaweed import EmbeddedSeaweed
    from tyr_runtime.seaweed_host import GRPC_OFFSET
    from tyr_runtime.storage import check_run_id, run_store

    work = root / "attacks"
    work.mkdir(parents=True, exist_ok=True)
    out: list[dict] = []
    marker = work / "RAN"
    payload = base64.b64encode(pickle.dumps(_Planted(marker))).decode()
    serializers = {
        "pickle": {"type": "pickle", "picklelib": "pickle"},
        "cloudpickle": {"type": "pickle", "picklelib": "cloudpickle"},
        "json+pickle jsonlib": {"type": "json", "jsonlib": "pickle", "object_decoder": None},
        "json+object decoder": {"type": "json", "object_decoder": "prefect.serializers.prefect_json_object_decoder"},
    }
    for name, serializer in serializers.items():
        record = json.dumps({"metadata": {"serializer": serializer, "storage_key": "k"}, "result": payload}).encode()
        _attack(out, f"result record: {name}", lambda r=record: ResultRecord.deserialize(r), marker.exists)

    data = work / "weed"
    with EmbeddedSeaweed(data) as server:
        store = server.open_store()
        store.put_bytes("runs/r1/secret.bin", b"secret " * 4096)
        ports = json.loads((data / "tyr-ports.json").read_text())
        ports["admin.port.grpc"] = ports["admin.port"] + GRPC_OFFSET
        for port_name, port in ports.items():
            for method, path, body in (
                ("GET", "/buckets/tyr/runs/r1/secret.bin", None),
                ("PUT", "/buckets/tyr/runs/r1/planted", b"x"),
                ("DELETE", "/buckets/tyr/runs/r1/secret.bin", None),
                ("GET", "/col/delete?collection=tyr", None),
                ("GET", "/dir/assign", None),
            ):

                def unauthenticated(url=f"http://127.0.0.1:{port}{path}", method=method, body=body):
                    try:
                        with urllib.request.urlopen(urllib.request.Request(url, body, method=method), timeout=5) as r:
                            return r.status if r.status >= 400 else f"HTTP {r.status}"
                    except urllib.error.HTTPError:
                        return False
                    except OSError:  # nothing listens there, or not HTTP
                        return False

                _attack(out, f"weed {port_name} {method} {path.split('?')[0]}", unauthenticated)
        intact = store.get_bytes("runs/r1/secret.bin") == b"secret " * 4096
        out.append({"attack": "weed objects intact afterwards", "refused": intact, "detail": ""})

    os.environ["PREFECT__RUNTIME__FLOW_RUN__DEPLOYMENT_ID"] = "00000000-0000-0000-0000-00000000c4a0"
    saved, safety._deployment_parameters = safety._deployment_parameters, lambda _d: {}
    try:
        for name, overrides in {
            "execution.address": ["execution.engine=ray", "execution.address=ray://attacker:10001"],
            "calibration.files": ["calibration.files=[/root]"],
            "calibration.text_field": ["calibration.text_field=refresh_token"],
            "eval.files": ["eval.files=[/etc]"],
            "model.trust_remote_code": ["model.trust_remote_code=true"],
        }.items():
            _attack(out, f"deployment override {name}", lambda o=overrides: resolve_config("tiny-test", overrides=o))
        _attack(out, "deployment store_url", lambda: safety.refuse_caller_parameters(store_url="file:///tmp/theirs"))
        _attack(out, "deployment endpoint_url", lambda: safety.refuse_caller_parameters(endpoint_url="http://x:9"))
        _attack(out, "deployment preset file", lambda: resolve_config(str(work / "theirs.yaml")))
    finally:
        safety._deployment_parameters = saved
        os.environ.pop("PREFECT__RUNTIME__FLOW_RUN__DEPLOYMENT_ID", None)

    tiny = resolve_model("tiny-random-llama")
    for name, values in {
        "heads=0": {"num_attention_heads": 0},
        "hidden=-64": {"hidden_size": -64},
        "layers=6000": {"num_hidden_layers": 6000},
    }.items():
        folder = work / f"hostile-{name}"
        shutil.copytree(tiny, folder, dirs_exist_ok=True)
        config = json.loads((folder / "config.json").read_text()) | values
        config.pop("head_dim", None)
        (folder / "config.json").write_text(json.dumps(config))
        _attack(out, f"config.json {name}", lambda f=folder: geometry(load_config(f)))
    decoy = work / "decoy"
    decoy.mkdir(exist_ok=True)
    shutil.copy(tiny / "config.json", decoy / "config.json")
    (decoy / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (decoy / "decoy.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    _attack(out, "decoy safetensors beside a pickle", lambda: resolve_model(decoy))
    _attack(out, "run id with a trailing newline", lambda: check_run_id("r1\n"))
    outside = work / "outside"
    outside.mkdir(exist_ok=True)
    (work / "store" / "runs").mkdir(parents=True, exist_ok=True)
    link = work / "store" / "runs" / "r1"
    if not link.is_symlink():
        link.symlink_to(outside, target_is_directory=True)
    _attack(out, "run folder as a symbolic link", lambda: run_store(f"file://{work / 'store'}", "r1"))
    out.extend(lock_attacks(work))
    return out


def lock_attacks(work: Path) -> list[dict]:
    """Writes beside the run's driver: a stalled holder after its fence, a taker whose clock runs an hour ahead, a
    Ray replica whose driver lost the lock (real clocks, a 2 s ttl)."""
    import time

    from tyr_runtime import lock
    from tyr_runtime.storage import run_store

    out: list[dict] = []
    base = f"file://{work / 'locks'}"
    other = {"host": "chaos-other-host", "flow_run_id": None}

    stalled_store = run_store(base, "stalled")
    stalled = lock.RunLock(stalled_store, "stalled", ttl=2, interval=0.5, identity=other | {"pid": 1}).acquire()
    lock._HELD[stalled_store.url] = stalled  # held, but its heartbeat never runs: a stalled process
    time.sleep(1.2)  # past its fence (2 s - 2 beats)
    try:
        _attack(
            out,
            "lock: a stalled holder writes past its fence",
            lambda: stalled_store.put_bytes("late.bin", b"x"),
            lambda: stalled_store.exists("late.bin"),
        )
    finally:
        lock._HELD.pop(stalled_store.url, None)

    live_store = run_store(base, "live")
    live = lock.RunLock(live_store, "live", ttl=2, interval=0.5, identity=other | {"pid": 2}).acquire().start()
    wall = lock._now
    lock._now = lambda: wall() + 3600
    try:
        taker = lock.RunLock(run_store(base, "live"), "live", ttl=2, identity=other | {"pid": 3})
        _attack(out, "lock: a taker an hour ahead takes a live lock", taker.acquire)
    finally:
        lock._now = wall
        live.release()

    driver_store = run_store(base, "replica")
    driver = lock.RunLock(driver_store, "replica", ttl=2, interval=0.5, identity=other | {"pid": 4}).acquire()
    replica_store = run_store(base, "replica")
    lock.work_for(replica_store.url, driver.body["token"])
    time.sleep(2.2)  # the driver's host died; a new driver watches its lock for a ttl and takes it
    lock.RunLock(run_store(base, "replica"), "replica", ttl=2, identity=other | {"pid": 5}).acquire()
    try:
        _attack(
            out,
            "lock: a Ray replica writes for a driver that lost the lock",
            lambda: replica_store.put_bytes("stale-copy.bin", b"x"),
            lambda: replica_store.exists("stale-copy.bin"),
        )
    finally:
        lock._WORKING_FOR.pop(replica_store.url, None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--fault-kills", type=int, default=3)
    parser.add_argument("--fault-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attacks-only", action="store_true", help="only the security attacks (seconds)")
    args = parser.parse_args()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="tyr-chaos-"))
    if args.attacks_only:
        tried = attacks(root)
        print(json.dumps({"bench": "chaos", **attack_figures(tried), "attacks": tried}, indent=1))
        return
    prefect, api = start_prefect(root)
    c = Chaos(root, api, args.seed)
    try:
        env = c.env("reference")
        code, _, err = c.finish(c.prune(env))
        assert code == 0, err
        reference = c.committed(env)
        kills = kill_chain(c, "kills", args.kills)
        faults = kill_chain(c, "faults", args.fault_kills, args.fault_rate)
        drivers = two_drivers(c, reference)
        store = store_killed(c, reference)
        corrupt = corrupt_and_recompute(c, c.env("kills"), reference)
        bad = bad_inputs(c)
        tried = attacks(root)
    finally:
        os.killpg(prefect.pid, signal.SIGTERM)
        prefect.wait(timeout=60)
    refused = [b for b in bad if b["exit"] not in (0, None)]
    lost = (
        lost_against(reference, kills.pop("final"))
        + lost_against(reference, faults.pop("final"))
        + drivers["lost"]
        + store["lost"]
        + corrupt["lost"]
    )
    print(
        json.dumps(
            {
                "bench": "chaos",
                "preset": "tiny-test",
                "store": "embedded SeaweedFS (tyr store serve for two-drivers and store-killed)",
                "prefect": "prefect server start (SQLite), loopback",
                "kills_survived": kills["kills"] + faults["kills"],
                "faults_injected": faults["faults_injected"],
                "bad_inputs_tried": len(bad),
                "bad_inputs_refused": len(refused),
                "artefacts_lost": lost,
                "committed_artefacts_recomputed": kills["recomputed"] + faults["recomputed"],
                "secrets_found_in_logs": secrets_in(c),
                **attack_figures(tried),
                "reference_artefacts": len(reference),
                "kill_chain": kills,
                "fault_chain": faults | {"rate": args.fault_rate},
                "two_drivers": drivers,
                "store_killed_mid_run": store,
                "corrupted_object": corrupt,
                "bad_inputs": bad,
                "attacks": tried,
                "wall_s": round(time.monotonic() - started, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 4 and sys.argv[1] == "--child":
        sys.exit(child(float(sys.argv[2]), sys.argv[3], sys.argv[5:]))
    main()
