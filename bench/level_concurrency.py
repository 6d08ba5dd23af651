"""Local-prune of one layer's levels on CPU: one at a time vs two threads at once (what the flow's task runner does
with ``concurrent_prunes=2``), on real SmolLM2 layers with the demo preset's calibration and grid.

Both produce the same copies (asserted). Each layer is pruned both ways, alternating which goes first, so the host's
drift hits both. Prints one JSON line per layer and a summary.  python bench/level_concurrency.py [--layers N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from transformers import AutoTokenizer

    from flows.recipes import resolve_config
    from tyr_core.families import resolve_model
    from tyr_core.layerwise import LayerwiseModel
    from tyr_core.pipeline import calibration_windows, initial_centres, plan_iteration, prune_settings
    from tyr_core.supernet_build import LayerCursor
    from tyr_runtime.real_assets import resolve_corpus

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--preset", default="smollm2-demo")
    args = parser.parse_args()
    cfg = resolve_config(args.preset)
    folder = resolve_model(cfg.model.source)
    calibration = cfg.calibration.model_copy(update={"files": resolve_corpus(cfg.calibration.files)})
    windows = calibration_windows(calibration, AutoTokenizer.from_pretrained(folder))
    lm = LayerwiseModel(folder)
    grid = plan_iteration(lm.geometry, cfg.prune, 1, initial_centres(lm.geometry, cfg.prune))
    cursor = LayerCursor(lm, windows, prune_settings(cfg.prune))
    one, two = [], []
    for layer in range(args.layers):
        subs = [s for s in grid if s.layer == layer]
        levels = sorted({lv for s in subs for lv in s.levels})
        cursor.hessians()  # computed once per layer either way, before the local-prune tasks

        def level_task(level: int, subs=subs) -> dict:
            return {(s.kind, level): cursor.prune(s, level) for s in subs if level in s.levels}

        def in_sequence(level_task=level_task, levels=levels) -> dict:
            return {k: v for lv in levels for k, v in level_task(lv).items()}

        def two_threads(level_task=level_task, levels=levels) -> dict:
            with ThreadPoolExecutor(max_workers=2) as pool:
                return {k: v for done in pool.map(level_task, levels) for k, v in done.items()}

        runs = [("one", in_sequence), ("two", two_threads)]
        timings, copies = {}, {}
        for name, fn in runs if layer % 2 == 0 else runs[::-1]:
            t0 = time.perf_counter()
            copies[name] = fn()
            timings[name] = time.perf_counter() - t0
        assert all(torch.equal(copies["one"][k].weight, copies["two"][k].weight) for k in copies["one"])
        one.append(timings["one"])
        two.append(timings["two"])
        seconds = {f"{name}_s": round(t, 2) for name, t in timings.items()}
        print(json.dumps({"layer": layer, "copies": len(copies["one"]), **seconds}), flush=True)
        by_kind: dict = {}
        for (kind, level), copy in copies["one"].items():
            by_kind.setdefault(kind, {})[level] = copy
        cursor.advance(grid, by_kind)
    print(
        json.dumps(
            {
                "metric": "local_prune_concurrency_cpu",
                "preset": args.preset,
                "threads": torch.get_num_threads(),
                "one_at_a_time_s_per_layer": round(statistics.median(one), 2),
                "two_at_once_s_per_layer": round(statistics.median(two), 2),
                "slowdown_two_at_once": round(statistics.median(t / o for t, o in zip(two, one, strict=True)), 2),
                "identical_copies": True,
            }
        )
    )


if __name__ == "__main__":
    main()
