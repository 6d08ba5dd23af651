"""Seconds until the read-only commands answer, each a fresh ``python -m tyr_cli`` process as a person runs it:
``--help``, ``recipes``, ``config keys``, ``runs`` and ``runs show`` on a folder store, a refused ``runs show`` of a
bad id, and ``runs`` on the embedded store when it has no data. Prints JSON: the median of ``--repeat`` runs (5)
per command, with the exit codes seen.

    python bench/cli_latency.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_store(root: Path) -> str:
    """A folder store holding one run as a run starts it (its committed run.json)."""
    sys.path.insert(0, str(REPO))
    from flows.recipes import resolve_config
    from tyr_core import keys
    from tyr_core.store import commit_bytes
    from tyr_runtime.storage import run_store

    config = resolve_config("tiny-test")
    store = run_store(f"file://{root}", "r1")
    body = {"run_id": "r1", "config": config.model_dump(mode="json"), "artefact_hash": config.artefact_hash()}
    commit_bytes(store, keys.RUN_CONFIG, json.dumps(body, sort_keys=True).encode(), "bench")
    return f"file://{root}"


def time_command(argv: list[str], env: dict[str, str], repeat: int) -> dict:
    seconds, codes = [], set()
    for _ in range(repeat):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "tyr_cli", *argv], cwd=REPO, env=env, capture_output=True)
        seconds.append(time.perf_counter() - started)
        codes.add(done.returncode)
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3), "exit": sorted(codes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="runs per command (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "store")
        env = {k: v for k, v in os.environ.items() if k not in ("TYR_STORE_URL", "PREFECT_API_URL")}
        env["TYR_CACHE"] = str(Path(tmp) / "empty-cache")  # an embedded store with no data yet
        commands = {
            "tyr --help": ["--help"],
            "tyr recipes": ["recipes"],
            "tyr config keys": ["config", "keys"],
            "tyr runs (folder store)": ["runs", "--store", store],
            "tyr runs show (folder store)": ["runs", "show", "r1", "--store", store],
            "tyr runs show ../etc (refused)": ["runs", "show", "../etc"],
            "tyr runs (embedded store, no data)": ["runs"],
        }
        results = {name: time_command(argv, env, args.repeat) for name, argv in commands.items()}
    print(
        json.dumps(
            {
                "bench": "cli_latency",
                "repeat": args.repeat,
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "commands": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
