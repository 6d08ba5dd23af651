"""Held-out perplexity of finished runs' final models on both held-out domains, and their physical size.

For each run: the final model (the best iteration's winner, as exported), scored on the Shakespeare plays never used
for calibration and on prose from the Python documentation (the windows ``bench/ablation.py`` uses), with the
fraction of decoder parameters physically removed and whether the layout is expressible as Nemotron-NAS (vLLM).
Runs of the same model and calibration settings (``tyr prune`` with two recipes, say) compare like for like.

    python bench/run_heldout.py --store DIR --run RUN [--store DIR2 --run RUN2 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from prose import python_docs_files

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.evaluate import final_layout  # noqa: E402
from tyr_core import keys  # noqa: E402
from tyr_core.calibration import eval_windows, load_documents  # noqa: E402
from tyr_core.errors import ExportError  # noqa: E402
from tyr_core.evaluate import perplexity  # noqa: E402
from tyr_core.export import nemotron_config  # noqa: E402
from tyr_core.param_count import layout_params  # noqa: E402
from tyr_core.pipeline import apply_layout  # noqa: E402
from tyr_core.store import best_iteration, read_json  # noqa: E402
from tyr_runtime.real_assets import shakespeare_dir, split_works  # noqa: E402
from tyr_runtime.run_status import finished_iteration  # noqa: E402
from tyr_runtime.workspace import RunRef, workspace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", action="append", required=True, help="a run's store (folder or URL), one per --run")
    ap.add_argument("--run", action="append", required=True)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16, help="held-out windows per domain")
    ap.add_argument("--iteration", type=int, default=None, help="an iteration's winner (its supernet must remain)")
    args = ap.parse_args()
    if len(args.store) != len(args.run):
        raise SystemExit("give one --store per --run")
    for store, run in zip(args.store, args.run, strict=True):
        url = store if "://" in store else Path(store).resolve().as_uri()
        ws = workspace(RunRef(run_id=run, store_url=url))
        if args.iteration is None:
            last = finished_iteration(ws.store, run)
            chosen, layout = best_iteration(ws.store, last), final_layout(ws, last)
        else:
            chosen = args.iteration
            layout = ws.reader(chosen).layout(read_json(ws.store, keys.result_key(chosen))["levels"])
        tok = ws.tokenizer()
        _, plays = split_works(shakespeare_dir())
        heldout = {
            "plays": eval_windows(tok, load_documents(plays), args.seq_len)[: args.windows],
            "prose": eval_windows(tok, load_documents(python_docs_files()), args.seq_len)[: args.windows],
        }
        model = ws.dense_model().eval()
        dense = {name: round(perplexity(model, w), 3) for name, w in heldout.items()}
        apply_layout(model, layout, ws.model.geometry)
        try:
            nemotron_config(ws.model.config, layout)
            vllm = True
        except ExportError:
            vllm = False
        print(
            json.dumps(
                {
                    "metric": "run_heldout",
                    "run_id": run,
                    "iteration": chosen,
                    "target_sparsity": ws.config.prune.target_sparsity,
                    "removed_fraction": round(layout_params(ws.model.config, layout)["removed_fraction"], 4),
                    "dense": dense,
                    "ppl": {name: round(perplexity(model, w), 3) for name, w in heldout.items()},
                    "nemotron_nas_expressible": vllm,
                    "torch_threads": torch.get_num_threads(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
