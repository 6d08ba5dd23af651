"""Per-unit overhead of the search on Ray actors against the same search in the process, and replicas 1/2/3.

A unit is one candidate on one evaluation batch (what ``KLEvaluator.batch_terms`` scores per candidate). On a run
with a committed supernet (iteration 1), the bench scores the same pools of offspring on the same windows with the
local ``KLEvaluator.pool`` and with ``RayPoolEvaluator`` on a local Ray cluster on loopback (one CPU per replica),
checks that every fitness has the same bits, and prints JSON: ms per unit, the Ray/local ratio, and for 1, 2 and 3
replicas the overhead. On a CPU host the replicas share the cores, so more replicas are not faster: the figure is
the cost of the Ray path, not a speed-up.

    python bench/scale_out.py                      # builds a tiny-test run first (a few minutes)
    python bench/scale_out.py --preset smollm2-demo --replicas 1   # SmolLM2 (its run takes minutes to build)
    python bench/scale_out.py --store file:///tmp/x --run-id R --replicas 1 2 3 --pools 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _ensure_run(store: str | None, run_id: str, preset: str) -> str:
    if store:
        return store
    root = Path(tempfile.mkdtemp(prefix="tyr-scale-out-"))
    url = f"file://{root}"
    cmd = [sys.executable, "-m", "tyr_cli", "prune", preset, "--store", url, "--run-id", run_id, "--json"]
    env = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"tyr prune {preset} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return url


def _pools(genes, parent, pools: int, offspring: int, seed: int) -> list[list[list[int]]]:
    from tyr_core.search import offspring as draw

    rng = np.random.Generator(np.random.PCG64(seed))
    return [draw(parent, genes, rng, offspring) for _ in range(pools)]


def _timed(evaluate, pools, windows) -> tuple[float, list[list[float]]]:
    start = time.perf_counter()
    scores = [evaluate.pool(pool, windows) for pool in pools]
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="store URL of a run with a committed iteration-1 supernet")
    parser.add_argument("--run-id", default="scale-out")
    parser.add_argument("--preset", default="tiny-test", help="the run built when no --store is given")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--pools", type=int, default=6, help="pools scored per measurement")
    parser.add_argument("--offspring", type=int, default=8)
    parser.add_argument("--windows", type=int, default=8, help="windows per pool (batches of 4)")
    args = parser.parse_args()

    import torch

    from tyr_core.config import ExecutionConfig
    from tyr_runtime import ray_engine, worker_steps
    from tyr_runtime.workspace import RunRef, forget, workspace

    torch.set_num_threads(1)  # as each one-CPU replica
    ref = RunRef(run_id=args.run_id, store_url=_ensure_run(args.store, args.run_id, args.preset))
    ws = workspace(ref)
    genes = ws.reader(1).sublayers
    parent = [0] * len(genes)
    pools = _pools(genes, parent, args.pools, args.offspring, seed=1)
    windows = list(range(args.windows))
    units = sum(len(p) for p in pools) * -(-len(windows) // 4)

    local = worker_steps.search_evaluator(ref, 1, parent)
    _timed(local, pools[:1], windows)  # warm: model, teacher, prefix cache
    local_s, local_scores = _timed(local, pools, windows)
    forget(ref)
    report = {
        "run": args.preset if not args.store else f"{ws.config.model.source} at {ws.config.prune.target_sparsity}",
        "units": units,
        "unit": "one candidate on one batch of 4 windows",
        "local_ms_per_unit": round(1000 * local_s / units, 3),
        "ray": {},
        "host_cpus": os.cpu_count(),
    }
    for replicas in args.replicas:
        ray_engine.request(ref, ExecutionConfig(engine="ray", replicas=replicas), torch_threads=1)
        try:
            start = time.perf_counter()
            engine = ray_engine.engine_for(ref)  # a local cluster on loopback, one CPU per replica
            evaluate = engine.evaluator(1, parent)
            _timed(evaluate, pools[:1], windows)  # warm: actors started, each loads its model
            warm_s = time.perf_counter() - start
            ray_s, ray_scores = _timed(evaluate, pools, windows)
            spread = dict(sorted(evaluate.units_sent.items()))
        finally:
            ray_engine.release(ref)
        report["ray"][str(replicas)] = {
            "ms_per_unit": round(1000 * ray_s / units, 3),
            "ratio_to_local": round(ray_s / local_s, 3),
            "overhead_ms_per_pool": round(1000 * (ray_s - local_s) / len(pools), 1),
            "start_and_load_s": round(warm_s, 1),
            "units_per_replica": spread,
            "bit_identical": ray_scores == local_scores,
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
