"""Safety rules that hold across the code base: input models never run their own code unless asked, nothing is
unpickled, and a second ``tyr prune`` of a run that another live process drives is refused without touching it."""

from __future__ import annotations

import ast
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tyr_cli import main
from tyr_core import keys
from tyr_core.errors import UnsupportedModelError
from tyr_core.families import load_config
from tyr_core.store import FileStore

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("tyr_core", "tyr_runtime", "tasks", "flows", "tyr_cli", "bench")


def _folder_with_custom_code(root: Path) -> Path:
    """A model folder whose config needs its own Python file; importing that file leaves a marker behind."""
    root.mkdir()
    config = {"model_type": "custom-evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}, "architectures": ["Evil"]}
    (root / "config.json").write_text(json.dumps(config))
    (root / "evil.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('custom code ran')\n"
        "from transformers import PretrainedConfig\n\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'custom-evil'\n"
    )
    return root


def test_a_model_with_its_own_code_is_refused_and_its_code_never_runs(tmp_path):
    folder = _folder_with_custom_code(tmp_path / "model")
    with pytest.raises(UnsupportedModelError, match=r"ships its own code.*model\.trust_remote_code=true"):
        load_config(folder)
    assert not (folder / "RAN").exists()


def test_no_shipped_code_unpickles():
    """safetensors only: no torch.load, pickle or numpy pickles in anything a user runs (tests may build inputs)."""
    banned = re.compile(
        r"\btorch\.load\(|\bpickle\.loads?\(|\bimport cloudpickle\b|\bcloudpickle\.loads?\(|allow_pickle\s*=\s*True"
        r"|weights_only\s*=\s*False"
    )
    hits = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for folder in SHIPPED
        for path in sorted((REPO / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if banned.search(line)
    ]
    assert hits == []


def test_no_shipped_code_trusts_remote_code_by_default():
    """No call passes ``trust_remote_code=True`` as a literal: it is always the user's setting, passed through."""
    hits = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for folder in SHIPPED
        for path in sorted((REPO / folder).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        for kw in node.keywords
        if kw.arg == "trust_remote_code" and isinstance(kw.value, ast.Constant) and kw.value.value is True
    ]
    assert hits == []


def test_a_second_prune_of_a_live_run_is_refused_and_changes_nothing(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        run = FileStore(tmp_path / "store" / "runs" / "busy")
        lock = {"host": socket.gethostname(), "pid": holder.pid, "flow_run_id": "f-1", "time": 0}
        run.put_bytes(keys.LOCK_KEY, json.dumps(lock).encode())
        before = {p: p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file()}
        argv = ["prune", "tiny-test", "--run-id", "busy", "--store", f"file://{tmp_path / 'store'}"]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 1 and "is being driven by another process" in err and f"pid {holder.pid}" in err
        assert {p: p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file()} == before
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------ settings and URLs from the API


def test_settings_that_run_code_are_refused_in_a_deployment_run_unless_the_deployment_allows_them(
    tmp_path, monkeypatch
):
    from flows.recipes import resolve_config
    from tyr_core.errors import ConfigError
    from tyr_runtime import safety
    from tyr_runtime.runs import open_run

    config = resolve_config("tiny-test", overrides=["model.trust_remote_code=true"])
    monkeypatch.delenv(safety.ALLOW_ENV, raising=False)
    safety.refuse_dangerous_settings(config)  # the user's own run (tyr prune, a script): their choice
    monkeypatch.setattr(safety, "_deployment_id", lambda: "dep-1")
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code=true .* refused in a run of deployment dep-1"):
        open_run(config, "r", f"file://{tmp_path}", None)
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    safety.refuse_dangerous_settings(resolve_config("tiny-test"))  # the default is fine anywhere
    monkeypatch.setenv(safety.ALLOW_ENV, "1")  # the deployment's own opt-in
    safety.refuse_dangerous_settings(config)


SECRET = "planted/SECRET+key/0123456789abcdef"


def test_credentials_in_urls_are_refused_as_flow_parameters_and_never_echoed():
    from prefect.exceptions import ParameterTypeError

    from flows.tyr import tyr
    from tyr_core.errors import ConfigError
    from tyr_core.redaction import redact, without_userinfo
    from tyr_runtime.storage import open_store

    with_secret = f"http://AKIA:{SECRET}@127.0.0.1:9000"
    for params in ({"endpoint_url": with_secret}, {"store_url": f"s3://AKIA:{SECRET}@bucket/p"}):
        with pytest.raises(ParameterTypeError):
            tyr.validate_parameters({"preset": "tiny-test", **params})
    for call in (lambda: open_store("s3://bucket/p", with_secret), lambda: open_store(f"s3://AKIA:{SECRET}@b/p")):
        with pytest.raises(ConfigError) as refused:
            call()
        assert SECRET not in str(refused.value) and "planted" not in str(refused.value) and "***" in str(refused.value)
    assert (
        redact(f"failed: {with_secret}/x and s3://k:{SECRET}@b") == "failed: http://***@127.0.0.1:9000/x and s3://***@b"
    )
    assert without_userinfo(with_secret) == "http://127.0.0.1:9000"


def test_a_bucket_name_error_names_the_rule():
    from tyr_core.errors import ConfigError
    from tyr_runtime.s3 import S3Store

    for bad in ("b", "UPPER", "under_score", "x" * 64, "-dash"):
        with pytest.raises(ConfigError, match="3-63 characters, lowercase letters, digits, '.' and '-'"):
            S3Store(bad, endpoint_url="http://127.0.0.1:1", access_key="a", secret_key="b")
    S3Store("abc", endpoint_url="http://127.0.0.1:1", access_key="a", secret_key="b")


def test_the_compose_file_ships_no_default_secret():
    text = (REPO / "docker" / "compose.yaml").read_text()
    secrets_ = re.findall(r"\$\{(\w*(?:PASSWORD|SECRET|ACCESS_KEY|TOKEN)\w*)(:?[-?])([^}]*)\}", text)
    assert {name for name, _, _ in secrets_} >= {"TYR_DB_PASSWORD", "TYR_S3_ACCESS_KEY", "TYR_S3_SECRET_KEY"}
    for name, op, default in secrets_:
        assert op == ":?" or default == "", f"{name} has the default {default!r}"  # required, or empty at most


def test_credentials_in_url_parameters_are_refused_before_prefect_stores_or_logs_the_run(
    prefect_server, tmp_path, caplog, capfd
):
    """A Python caller of the flow: Prefect validates parameters after it has created the flow run (its database
    and its log line ``Parameters: {...}``), so the check runs before the call reaches Prefect."""
    import logging
    import uuid

    import httpx
    from conftest import in_process_client

    from flows.tyr import tyr
    from tyr_core.errors import ConfigError

    planted = f"PLANTED{uuid.uuid4().hex}"

    def flow_runs() -> int:
        return httpx.post(f"{prefect_server.api_url}/flow_runs/count", json={}, timeout=30).json()

    before = flow_runs()
    caplog.set_level(logging.DEBUG)
    with in_process_client(prefect_server):
        for params in (
            {"endpoint_url": f"http://AKIA:{planted}@127.0.0.1:9/"},
            {"store_url": f"s3://AKIA:{planted}@bucket/p"},
            {"store_url": f"file://{tmp_path}", "endpoint_url": f"AKIA:{planted}@127.0.0.1:9"},  # no scheme
        ):
            with pytest.raises(ConfigError, match=f"flow parameter {next(reversed(params))} holds credentials") as err:
                tyr(preset="tiny-test", run_id="sec1", **params)
            assert planted not in str(err.value)
    assert flow_runs() == before  # no flow run was created
    out, errs = capfd.readouterr()
    assert planted not in out + errs + caplog.text
    stored = [p for p in prefect_server.home.rglob("*") if p.is_file() and planted.encode() in p.read_bytes()]
    assert stored == []  # prefect.db, its WAL, result storage
    assert not (tmp_path / "runs").exists()
