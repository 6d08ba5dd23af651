"""Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group of a real ``tyr prune tiny-test``
mid-run. The command exits 130 with one line saying how to resume, its temporary Prefect server is stopped by it,
and the same command then resumes without recomputing anything committed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment holds ``name=value`` (this test's private PREFECT_HOME)."""
    needle = f"{name}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def manifests(store: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in store.rglob("*.manifest.json")}


@pytest.mark.slow
def test_sigint_to_the_process_group_stops_prune_with_130_and_resume_recomputes_nothing(tmp_path):
    home = tmp_path / "prefect"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "TYR_STORE_URL")},
        "PREFECT_HOME": str(home),
        "OMP_NUM_THREADS": "1",
    }
    store = tmp_path / "store"
    command = [sys.executable, "-m", "tyr_cli", "prune", "tiny-test", "--run-id", "i1", "--store", f"file://{store}"]
    # Its own process group and session, as a shell gives a foreground job: killpg reaches every process in it.
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        copies = store / "runs" / "i1"
        deadline = time.monotonic() + 600  # a guard against a hung run, not a timing assertion
        while time.monotonic() < deadline and proc.poll() is None:
            if any(copies.rglob("level*.manifest.json")) or any(copies.rglob("gen-*.manifest.json")):
                break  # mid-run: the supernet or the search has begun committing
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()}"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    resume = "interrupted: committed work is kept; the same command resumes run i1"
    assert err.count(resume) == 1, err
    assert err.rstrip().splitlines()[-1].startswith(resume), err
    assert "Traceback" not in err and "ConnectError" not in err and "Connection refused" not in err, err
    assert processes_with_env("PREFECT_HOME", str(home)) == []  # the temporary server was stopped, not orphaned

    committed = manifests(store)
    assert committed, "nothing was committed before the interrupt"
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr
    assert "resuming run i1" in done.stderr
    assert {p: p.stat().st_mtime_ns for p in committed} == committed  # nothing committed was written again
