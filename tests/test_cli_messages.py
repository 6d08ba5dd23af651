"""Messages that point the right way, each with its exit code, and each as docs/troubleshooting.md prints it; the
plan of ``tyr prune --dry-run``, which starts nothing; and ``tyr config keys``."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from test_cli import run_cli

REPO = Path(__file__).resolve().parents[1]
TROUBLESHOOTING = (REPO / "docs" / "troubleshooting.md").read_text()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def documented(entry: str) -> re.Pattern:
    """The troubleshooting page's ``message starts with`` entry as a pattern: its placeholders match any text."""
    assert f"`{entry}" in TROUBLESHOOTING, f"docs/troubleshooting.md has no entry starting with `{entry}`"
    parts = re.split(r"\b(?:X|K|N|D|P|URL|S)\b|\.\.\.", entry)
    return re.compile(".*?".join(re.escape(p) for p in parts))


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def refused(argv: list[str], capsys, store: Path) -> str:
    """The one error line of a refused command (exit 2), after checking that it wrote nothing."""
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == "", err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not list(store.rglob("*")) if store.exists() else True
    return err.removeprefix("error: ").strip()


def test_a_model_path_that_does_not_exist_says_so(tmp_path, capsys):
    store = tmp_path / "store"
    for missing in (str(tmp_path / "nope"), "./models/nope", str(tmp_path / "m.gguf")):
        message = refused(["prune", missing, "--sparsity", "0.5", "--store", f"file://{store}"], capsys, store)
        assert documented("model path 'X' does not exist").match(message), message
        assert "unknown model" not in message


def test_a_mistyped_model_name_gets_the_nearest_names(tmp_path, capsys):
    store = tmp_path / "store"
    message = refused(["prune", "smollm2-5O", "--store", f"file://{store}"], capsys, store)
    assert documented("unknown model or shorthand 'X'").match(message)
    assert "did you mean smollm2-50" in message


@pytest.mark.parametrize(
    "key,nearest",
    [
        ("search.ofspring", "search.offspring"),
        ("prune.iteration", "prune.iterations"),
        ("offspring", "search.offspring"),
    ],
)
def test_an_unknown_set_key_gets_did_you_mean(key, nearest, tmp_path, capsys):
    store = tmp_path / "store"
    message = refused(["prune", "tiny-test", "--set", f"{key}=3", "--store", f"file://{store}"], capsys, store)
    assert documented("unknown setting 'X' (--set ...)").match(message), message
    assert f"did you mean {nearest}" in message and "Extra inputs" not in message


def test_an_s3_endpoint_where_nothing_listens_is_not_reported_as_missing_credentials(
    tmp_path, capsys, no_aws_credentials
):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    for argv in (["prune", "tiny-test"], ["runs"], ["runs", "show", "r1"]):
        code, out, err = run_cli([*argv, "--store", "s3://tyr/x", "--endpoint-url", endpoint], capsys)
        assert code == 2 and out == "", err
        message = err.removeprefix("error: ")
        assert documented("cannot reach the S3 endpoint").match(message), err
        assert "credentials" not in message and endpoint in message and err.count("\n") == 1


def test_eval_of_a_folder_without_tokenizer_files_says_so(tiny_folder, tmp_path, capsys):
    folder = tiny_folder("llama")  # weights and config.json only
    capsys.readouterr()  # the fixture's own output
    (tmp_path / "text.txt").write_text("To be, or not to be, that is the question. " * 50)
    code, _, err = run_cli(["eval", str(folder), "--text", str(tmp_path / "text.txt")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert documented("X: the model folder D has no tokenizer files").match(err.removeprefix("error: ")), err
    assert "0 tokens" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cuda_device_without_one_is_refused_before_the_run_is_created(device, tmp_path, capsys):
    store = tmp_path / "store"
    message = refused(["prune", "tiny-test", "--set", f"device={device}", "--store", f"file://{store}"], capsys, store)
    assert documented("device=X: this host has no CUDA device").match(message), message


def test_zero_generations_says_no_search_will_run(tmp_path, capsys):
    store = tmp_path / "store"
    argv = ["prune", "tiny-test", "--dry-run", "--store", f"file://{store}"]
    code, _, err = run_cli([*argv, "--set", "search.generations=0"], capsys)
    assert code == 0 and documented("note: search.generations=0: no search will run").search(err), err
    code, _, err = run_cli(argv, capsys)
    assert code == 0 and "no search will run" not in err


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TYR_STORE_URL", raising=False)
    real = Path(os.environ.get("TYR_CACHE") or Path.home() / ".cache" / "tyr")
    cache = tmp_path / "cache"
    cache.mkdir()
    (real / "models").mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(real / "models")  # the tiny model's cached copy; no store data
    monkeypatch.setenv("TYR_CACHE", str(cache))

    def no_process(*args, **kwargs):
        raise AssertionError(f"--dry-run started a process: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    code, out, err = run_cli(["prune", "tiny-test", "--sparsity", "0.5", "--dry-run"], capsys)
    assert code == 0, err
    assert "resolved config" in out and "target_sparsity: 0.5" in out
    assert re.search(r"attn: \d+ groups x 2 layers; \d+ removed: reachable sparsity 0\.5000", out), out
    assert "estimated (not measured): wall time ~" in out and "peak memory ~" in out and "disk ~" in out
    assert not (cache / "seaweedfs").exists()  # the embedded store was not started
    code, out, _ = run_cli(["prune", "tiny-test", "--dry-run", "--json"], capsys)
    plan = json.loads(out)
    assert plan["groups"]["mlp"]["reachable_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert plan["estimates"]["label"].startswith("estimates") and plan["estimates"]["disk_bytes"] > 0


def test_config_keys_lists_every_setting_with_type_default_and_meaning(capsys):
    code, out, _ = run_cli(["config", "keys", "--json"], capsys)
    rows = {row["key"]: row for row in json.loads(out)}
    assert code == 0
    assert rows["search.offspring"]["type"] == "int" and rows["search.offspring"]["default"] == 128
    assert "children" in rows["search.offspring"]["meaning"]
    assert rows["model.dtype"]["type"] == "float32|bfloat16|float16"
    assert rows["device_memory_mb"]["type"] == "int or null" and rows["calibration.files"]["type"] == "list[str]"
    assert {"keep_last", "execution.engine", "teacher.topk", "prune.iterations", "eval.max_windows"} <= set(rows)
    code, out, _ = run_cli(["config", "keys", "--json", "--recipe", "tiny-test"], capsys)
    tiny = {row["key"]: row for row in json.loads(out)}
    assert tiny["search.generations"]["default"] != rows["search.generations"]["default"]
    code, out, _ = run_cli(["config", "keys"], capsys)
    assert code == 0 and "search.offspring (int, default 128)" in out
    code, _, err = run_cli(["config", "keys", "--recipe", "nope"], capsys)
    assert code == 2 and "unknown recipe 'nope'" in err


def test_the_summary_states_target_physical_fractions_and_wall_time(capsys):
    from types import SimpleNamespace

    from flows.recipes import resolve_config
    from tyr_cli.prune import print_summary

    run = SimpleNamespace(config=resolve_config("tiny-test"), run_id="r1", store=SimpleNamespace(url="file:///s"))
    dense = {"total": 3_219_776}
    pruned = {"total": 3_187_008, "removed_fraction": 0.443}
    result = {"report": {"baselines": {"dense_params": dense, "uniform_params": pruned}, "tyr_params": pruned}}
    print_summary(result, 110.0, {}, run)
    out = capsys.readouterr().out
    assert "target: 50.0% of attention heads and MLP neurons" in out
    assert "physically removed: 1.0% of the model's (3,219,776 -> 3,187,008), 44.3% of the decoder's" in out
    assert "wall time: 1m50s (from the command's start)" in out


def test_runs_show_names_the_final_iteration_and_its_validation_kl(tmp_path, capsys):
    from flows.recipes import resolve_config
    from tyr_core import keys
    from tyr_core.store import commit_bytes
    from tyr_runtime.storage import run_store

    config = resolve_config("tiny-test")
    store = run_store(f"file://{tmp_path}", "r1")

    def commit(key: str, obj: dict) -> None:
        commit_bytes(store, key, json.dumps(obj).encode(), "test")

    commit(keys.RUN_CONFIG, {"run_id": "r1", "config": config.model_dump(mode="json"), "artefact_hash": "h"})
    for it, search_kl, validation_kl in ((1, 0.5, 0.25), (2, 0.125, 0.375)):  # the search KL favours iteration 2
        body = {
            "iteration": it,
            "fitness": search_kl,
            "validation_fitness": validation_kl,
            "levels": [0],
            "sparsities": {},
        }
        commit(keys.result_key(it), body)
    commit(keys.final_report_key(config.prune.iterations), {"iteration": 1, "tyr_ppl": 2.0})
    code, out, _ = run_cli(["runs", "show", "r1", "--store", f"file://{tmp_path}"], capsys)
    assert code == 0 and "validation KL" in out and "*1" in out and "*2" not in out
    assert "final model: iteration 1, the lowest validation KL" in out
