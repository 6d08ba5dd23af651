"""Evaluation: held-out perplexity (token-weighted, no BOS, non-overlapping windows) and latency."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(token-weighted mean next-token NLL) over ``windows`` ``(N, T)``."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size]
            logits = model(ids).logits[:, :-1].float()
            target = ids[:, 1:]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
            count += target.numel()
    return math.exp(nll / count)


def latency(model: nn.Module, prompt_len: int = 128, gen_len: int = 32, vocab: int | None = None) -> dict:
    """Prefill and decode throughput (tokens/s) with a KV cache, after one warm-up."""
    vocab = vocab or model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    ids = ids.to(device)

    def run() -> tuple[float, float]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            t1 = time.perf_counter()
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(gen_len):
                out = model(nxt, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    run()
    prefill, decode = run()
    return {
        "prefill_tok_s": prompt_len / prefill,
        "decode_tok_s": gen_len / decode,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "device": str(device),
    }
