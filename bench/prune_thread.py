"""Where the flow runs its local-prune tasks, on CPU: in the flow's own thread, or in a task-runner thread.

The flow's build (layer-stats, local-prune at every level, accumulate: the task functions themselves, without
Prefect) on the first layers of SmolLM2 with the demo preset, each way in a fresh process, alternating, so both
see the same host drift. A thread other than the main one that runs torch gets an OpenMP team of its own; with more
OpenMP threads than cores libgomp stops spinning at its barriers, so every parallel region waits for sleeping
workers. This bench is why ``concurrent_prunes=1`` prunes in the flow's thread. Prints JSON lines.

    python bench/prune_thread.py [--layers N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scratch import scratch_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(where: str, layers: int) -> dict:
    """The first ``layers`` layers of iteration 1's build, local prunes in this thread or in a pool thread."""
    from flows.recipes import resolve_config
    from tasks.data import calibrate
    from tasks.supernet import accumulate, layer_stats, local_prune, plan
    from tyr_runtime.runs import open_run

    cfg = resolve_config("smollm2-demo")
    with tempfile.TemporaryDirectory(prefix="tyr-bench-thread-") as scratch:
        ref = open_run(cfg, f"thread-{where}", f"file://{scratch}", None)
        calibrate.fn(ref)
        grid = plan.fn(ref, 1)
        pool = ThreadPoolExecutor(max_workers=1)  # lives for the build, as the flow's task runner does
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for layer in range(layers):
            subs = [s for s in grid["sublayers"] if s["layer"] == layer]
            layer_stats.fn(ref, 1, layer)
            for level in sorted({lv for s in subs for lv in range(s["lo"], s["hi"] + 1)}):
                kinds = [s["kind"] for s in subs if s["lo"] <= level <= s["hi"]]
                if where == "flow-thread":
                    local_prune.fn(ref, 1, layer, {level: kinds})
                else:
                    pool.submit(local_prune.fn, ref, 1, layer, {level: kinds}).result()
            accumulate.fn(ref, 1, layer)
        wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        pool.shutdown()
    return {
        "where": where,
        "wall_s": round(wall, 1),
        "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
        "voluntary_context_switches": after.ru_nvcsw - before.ru_nvcsw,
    }


def in_fresh_process(where: str, layers: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", where, "--layers", str(layers)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PREFECT_HOME": str(scratch_dir("tyr-prefect-"))},  # no Prefect run; keep ~/.prefect clean
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_switches(results: list[dict]) -> int:
    return int(statistics.median(r["voluntary_context_switches"] for r in results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="layers of the build (default 8 of SmolLM2's 30)")
    parser.add_argument("--repeats", type=int, default=2, help="alternated pairs (default 2)")
    parser.add_argument("--child", choices=["flow-thread", "pool-thread"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(build(args.child, args.layers)))
        return
    runs: dict[str, list[dict]] = {"flow-thread": [], "pool-thread": []}
    order = list(runs)
    for repeat in range(args.repeats):
        for where in order if repeat % 2 == 0 else order[::-1]:
            result = in_fresh_process(where, args.layers)
            runs[where].append(result)
            print(json.dumps({"repeat": repeat, **result}), flush=True)
    best = {where: min(r["wall_s"] for r in rs) for where, rs in runs.items()}
    print(
        json.dumps(
            {
                "metric": "local_prune_thread_cpu",
                "layers": args.layers,
                "flow_thread_s": best["flow-thread"],
                "pool_thread_s": best["pool-thread"],
                "slowdown_in_pool_thread": round(best["pool-thread"] / best["flow-thread"], 2),
                "context_switches": {w: median_switches(rs) for w, rs in runs.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
