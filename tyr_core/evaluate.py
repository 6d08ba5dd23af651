"""Evaluation of a (pruned) causal LM: held-out perplexity, prefill/decode latency, and lm-evaluation-harness tasks.

Perplexity follows docs/algorithm.md: documents joined with "\\n\\n", tokenised without special tokens (no BOS),
cut into non-overlapping windows with the remainder dropped, token-weighted mean NLL, then exp. Downstream tasks
go through EleutherAI's lm-evaluation-harness (``pip install lm_eval``), an optional dependency imported only by
``lm_eval_tasks``; the paper reports plain ``acc`` (not ``acc_norm``), MMLU 5-shot.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CalibrationError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def text_windows(tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int) -> torch.LongTensor:
    """Non-overlapping evaluation windows of ``seq_len`` tokens from ``texts``.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: documents, joined with "\\n\\n" and tokenised once without special tokens (no BOS).
        seq_len: tokens per window.

    Returns:
        ``(N, seq_len)`` int64 token ids; the tokens after the last full window are dropped.

    Raises:
        CalibrationError: the texts are empty or shorter than one window.
    """
    if seq_len < 2:
        raise CalibrationError(f"seq_len must be at least 2 to predict a token, got {seq_len}")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    count = len(ids) // seq_len
    if count == 0:
        raise CalibrationError(f"the texts give {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """exp of the token-weighted mean next-token NLL over ``windows``.

    Each window is scored on its own (no BOS is added, no context carried over); its first token is context only,
    so ``N * (T - 1)`` tokens are predicted in all.

    Args:
        model: a causal LM returning ``.logits``; evaluated in inference mode, without a KV cache.
        windows: ``(N, T)`` token ids, ``T >= 2``.
        batch_size: windows per forward pass.
        logits_fn: ``input_ids -> logits`` when the model does not run as a whole (decoder blocks streamed
            through the device); default ``model(input_ids).logits``.

    Returns:
        The perplexity.

    Raises:
        CalibrationError: ``windows`` is not a non-empty 2-D tensor of at least 2 tokens per window.
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise CalibrationError(f"windows must be (N >= 1, T >= 2) token ids, got shape {tuple(windows.shape)}")
    device = _device(model)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits if logits_fn is None else logits_fn(ids)
            for row in range(ids.shape[0]):  # one window at a time: fp32 logits of a whole batch can be gigabytes
                nll += float(F.cross_entropy(logits[row, :-1].float(), ids[row, 1:], reduction="sum"))
            count += ids.shape[0] * (ids.shape[1] - 1)
    return math.exp(nll / count)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_generation(model: nn.Module, prompt: torch.Tensor, gen_len: int) -> tuple[float, float]:
    """Seconds for the prefill (prompt -> first token) and for ``gen_len`` greedy cached decode steps."""
    device = prompt.device
    with torch.inference_mode():
        _synchronize(device)
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        _synchronize(device)
        prefilled = time.perf_counter()
        cache = out.past_key_values
        for _ in range(gen_len):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _synchronize(device)
        done = time.perf_counter()
    return prefilled - start, done - prefilled


def latency(
    model: nn.Module,
    prompt_len: int = 128,
    gen_len: int = 32,
    device: torch.device | str | None = None,
    batch_size: int = 1,
    repeats: int = 3,
) -> dict:
    """Prefill and decode throughput with a KV cache, after one warm-up run (best of ``repeats``).

    The prompt is seeded random token ids; decoding is greedy and ignores EOS, so exactly ``gen_len`` tokens are
    generated per sequence (the paper reports TTFT and decode tokens/s at in = out = 2048).

    Args:
        model: a causal LM (``logits``, ``past_key_values``, ``logits_to_keep``), in eval mode.
        prompt_len: prompt tokens per sequence.
        gen_len: tokens decoded per sequence after the first.
        device: where to run; the model is moved there if it is elsewhere. Default: the model's device.
        batch_size: sequences per run.
        repeats: timed runs; the fastest is reported (the least disturbed by other work).

    Returns:
        ``prefill_tok_s`` and ``decode_tok_s`` (tokens per second over the batch), ``ttft_s`` (prefill seconds),
        ``decode_s``, and the settings.
    """
    device = torch.device(device) if device is not None else _device(model)
    if _device(model) != device:
        model.to(device)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=generator).to(device)
    _timed_generation(model, prompt, min(gen_len, 4))  # warm-up: kernels, allocator, lazy init
    runs = [_timed_generation(model, prompt, gen_len) for _ in range(max(1, repeats))]
    prefill, decode = min(r[0] for r in runs), min(r[1] for r in runs)
    return {
        "prefill_tok_s": batch_size * prompt_len / prefill,
        "decode_tok_s": batch_size * gen_len / decode if gen_len else float("nan"),
        "ttft_s": prefill,
        "decode_s": decode,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "batch_size": batch_size,
        "device": str(device),
    }


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """lm-eval's task index (it scans thousands of task files, so it is built once per include_path)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def lm_eval_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    include_path: Path | str | None = None,
    seed: int = 0,
    add_bos_token: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness tasks on an in-memory model (dense, masked or compact ``TyrForCausalLM``).

    The harness logs and shows progress bars through its own loggers (set to ERROR here) and tqdm on stderr.

    Args:
        model: a Hugging Face ``PreTrainedModel`` causal LM, on the device to evaluate on.
        tokenizer: its tokenizer.
        tasks: task names (``"arc_easy"``, ``"mmlu"``, …) or names defined in ``include_path``.
        num_fewshot: few-shot examples (the paper: 0, and 5 for MMLU); None: each task's default.
        limit: documents per task (int) or fraction (float); None: all.
        batch_size: requests per forward pass.
        include_path: a folder of extra task YAML files (e.g. local, offline tasks).
        seed: seed of the harness's random, numpy and torch generators and of few-shot sampling.
        add_bos_token: passed to the harness's ``HFLM`` (None: its default for the tokenizer).

    Returns:
        Task -> metric -> value, with the harness's metric keys (``"acc,none"``, ``"acc_stderr,none"``, …);
        see ``accuracy``.

    Raises:
        ImportError: lm-evaluation-harness is not installed (``pip install lm_eval``).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError("lm_eval_tasks needs lm-evaluation-harness: pip install lm_eval") from err
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        backend="causal",
        device=str(_device(model)),
        add_bos_token=add_bos_token,
    )
    out = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=_task_manager(str(include_path) if include_path is not None else None),
        log_samples=False,
        verbosity="ERROR",
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return {
        task: {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for task, metrics in out["results"].items()
    }


def accuracy(results: dict[str, dict[str, float]], metric: str = "acc") -> dict[str, float]:
    """Task -> ``metric`` (default plain ``acc``, as the paper reports) from ``lm_eval_tasks`` results."""
    key = f"{metric},none"
    return {task: metrics[key] for task, metrics in results.items() if key in metrics}
