"""tyr's hot paths on an accelerator: a random-weight model of Llama-3.1-8B's geometry in bf16, built on the device.

Prints one JSON object: the device's measured bf16 matmul peak; one layer's supernet build (H accumulation,
9 levels x 2 sublayers of local prunes, the expected-weight accumulation) at a stated token count; search
throughput in scored tokens/s and as a fraction of the forward's roofline (2 x parameters FLOP per token at the
measured peak), with the time a paper-size generation (~1.18M scored tokens) would take; the same with decoder
blocks streamed through the device; peak memory. Needs torch and transformers only (no Prefect, no network).

    python bench/gpu.py                       # on a GPU host: Llama-3.1-8B geometry
    python bench/gpu.py --device cpu --quick  # CPU smoke test: a small geometry, same JSON keys
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tyr_core.device import configure_numerics, resolve_device  # noqa: E402
from tyr_core.families import geometry  # noqa: E402
from tyr_core.fitness import topk_kl  # noqa: E402
from tyr_core.grid import build_sublayers  # noqa: E402
from tyr_core.layerwise import Activations, run_block  # noqa: E402
from tyr_core.local_prune import prepare  # noqa: E402
from tyr_core.prefix import PrefixForward  # noqa: E402
from tyr_core.streaming import BlockStreamer, weight_bytes  # noqa: E402
from tyr_core.supernet import output_linear  # noqa: E402
from tyr_core.supernet_build import PruneSettings, expected_weight, layer_stats, prune_copy  # noqa: E402

LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=8192,
)
QUICK = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=8192,
    max_position_embeddings=1024,
)
PAPER_GENERATION_TOKENS = 1_180_000  # scored tokens of one generation at the paper's settings


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def matmul_peak(device: torch.device, n: int, repeats: int) -> float:
    """Measured bf16 matmul FLOP/s (the best of ``repeats``)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b  # warm-up
    best = min(timed(device, lambda: a @ b)[0] for _ in range(repeats))
    return 2 * n**3 / best


def build_model(cfg: dict, device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False)).to(torch.bfloat16).eval()
    model.config._attn_implementation = "sdpa"
    return model


def supernet_layer(model, device: torch.device, windows: int, seq_len: int, batch: int) -> dict:
    """One decoder layer's share of a supernet build, phase by phase (the build repeats it for every layer)."""
    geo = geometry(model.config)
    block = model.model.layers[0]
    shape = (windows, seq_len, geo.hidden)
    budget = 64 << 30
    acts = [Activations(shape, torch.bfloat16, budget, None, device, budget) for _ in range(2)]
    acts[0].data.normal_()
    pos = model.model.rotary_emb(acts[0].data[:1], torch.arange(seq_len, device=device)[None])
    subs = [
        s
        for s in build_sublayers(
            {"attn": geo.heads, "mlp": geo.intermediate},
            1,
            {"attn": [geo.heads // 2], "mlp": [geo.intermediate // 2]},
            0.125,
            9,
        )
    ]
    settings = PruneSettings()
    stats_s, hessians = timed(device, lambda: layer_stats(block, acts[0], pos, batch))
    copies, prune_s = {}, 0.0
    for sub in subs:
        dense = output_linear(block, sub.kind).weight.detach().clone()
        seconds, problem = timed(device, lambda dense=dense, sub=sub: prepare(dense, hessians[sub.kind]))
        prune_s += seconds
        for level in sub.levels:
            seconds, copy = timed(device, lambda p=problem, s=sub, lv=level: prune_copy(p, s, lv, geo, settings))
            copies.setdefault(sub.kind, {})[level] = copy
            prune_s += seconds

    def accumulate() -> None:
        for sub in subs:
            lin = output_linear(block, sub.kind)
            new = expected_weight(sub, copies[sub.kind], lin.weight.detach(), geo, "expectation")
            with torch.no_grad():
                lin.weight.copy_(new)
        run_block(block, acts[0], acts[1], pos, batch)

    accumulate_s, _ = timed(device, accumulate)
    return {
        "tokens": windows * seq_len,
        "levels": len(subs[0].levels),
        "stats_s": round(stats_s, 3),
        "prune_s": round(prune_s, 3),
        "accumulate_s": round(accumulate_s, 3),
        "layer_s": round(stats_s + prune_s + accumulate_s, 3),
        "model_s": round((stats_s + prune_s + accumulate_s) * geo.num_layers, 1),
    }


def scoring(forward: PrefixForward, device, windows: torch.Tensor, k: int, batch: int, repeats: int) -> float:
    """Scored tokens/s of candidate forwards + top-k KL against a teacher (the search's inner loop)."""
    vocab = forward.model.config.vocab_size
    values = torch.randn(batch, windows.shape[1], k, device=device, dtype=torch.float16)
    ids = torch.randint(0, vocab, (batch, windows.shape[1], k), device=device, dtype=torch.int32)

    def run() -> int:
        tokens = 0
        with torch.inference_mode():
            for start in range(0, windows.shape[0], batch):
                logits = forward.logits(windows[start : start + batch], [])
                tokens += topk_kl(values[: logits.shape[0]], ids[: logits.shape[0]], logits)[1]
        return tokens

    run()  # warm-up
    best = min(timed(device, run)[0] for _ in range(repeats))
    return windows.shape[0] * (windows.shape[1] - 1) / best


def progress(out: dict) -> None:
    """The figures so far, on stderr: a run stopped by a time limit still leaves what it measured."""
    print(json.dumps(out), file=sys.stderr, flush=True)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="a small geometry (the CPU smoke test)")
    ap.add_argument("--deterministic", action="store_true")
    args = ap.parse_args()
    device = resolve_device(args.device)
    configure_numerics(device, args.deterministic)
    quick = args.quick
    cfg = QUICK if quick else LLAMA_8B
    seq_len = 128 if quick else 2048
    out: dict = {"device": str(device), "geometry": "quick" if quick else "llama-3.1-8b", "dtype": "bfloat16"}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
    out["torch"] = torch.__version__
    peak = matmul_peak(device, 1024 if quick else 8192, 3 if quick else 10)
    out["matmul_peak_tflops"] = round(peak / 1e12, 3)
    progress(out)

    model = build_model(cfg, device)
    params = sum(p.numel() for p in model.parameters())
    out["params"] = params
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, cfg["vocab_size"], (8 if quick else 32, seq_len), generator=g)
    k, batch, repeats = (256 if quick else 8192), (4 if quick else 8), (1 if quick else 3)
    resident = scoring(PrefixForward(model, [], 0), device, windows, k, batch, repeats)
    roofline = peak / (2 * params)
    out["search"] = {
        "scored_tokens_per_s": round(resident),
        "roofline_fraction": round(resident / roofline, 3),
        "paper_generation_s": round(PAPER_GENERATION_TOKENS / resident, 1),
    }
    progress(out)
    host = model.to("cpu")  # the streamed model keeps its weights in host memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    streamer = BlockStreamer(host, device, always_copy=quick and device.type == "cpu")
    streamed = scoring(PrefixForward(host, [], 0, streamer), device, windows, k, batch, repeats)
    out["streamed"] = {
        "scored_tokens_per_s": round(streamed),
        "slowdown_vs_resident": round(resident / streamed, 3),
        "weights_gb": round(weight_bytes(host) / 1e9, 2),
        "peak_device_mb_streamed": peak_memory_mb(device),
    }
    progress(out)
    del host, streamer, model

    model = build_model(cfg, device)
    out["supernet_layer"] = supernet_layer(model, device, 8 if quick else 64, seq_len, 4 if quick else 8)
    out["peak_memory_mb"] = peak_memory_mb(device)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
