"""``tyr eval``: held-out perplexity and parameter count of any model folder, GGUF file, hub name or export."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .common import add_command, one_line, out_console, positive_int, print_json, refusing
from .progress import preparing, quiet_libraries

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_model_for_eval(
    source: str, dtype_name: str, trust_remote_code: bool, announce: Callable[[str], None] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """(model, tokenizer, folder) of a local HF folder, a GGUF file, a hub name, or a tyr compact export; ``announce``
    is told when the model is first converted or downloaded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tyr_core.export  # noqa: F401  registers tyr_llama: compact exports load without remote code
    from tyr_core.errors import UnsupportedModelError
    from tyr_core.families import resolve_model

    folder = resolve_model(source, announce=announce)
    check_tokenizer_files(source, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype_name), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, ImportError) as err:
        hint = "" if trust_remote_code else " (if it needs its own code, and you trust it: --trust-remote-code)"
        raise UnsupportedModelError(f"cannot load {source} as a causal LM: {one_line(str(err))}{hint}") from None
    return model.eval(), tokenizer, folder


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tekken.json")


def check_tokenizer_files(source: str, folder: Path) -> None:
    """A folder without a tokenizer is named as such, not found later as text of 0 tokens."""
    from tyr_core.errors import UnsupportedModelError

    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UnsupportedModelError(
            f"{source}: the model folder {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}): copy "
            "them from the model it was made from"
        )


def eval_documents(
    args: argparse.Namespace, announce: Callable[[str], None] | None = None
) -> tuple[list[str], list[str]]:
    """The documents of ``--text`` files, ``--dataset``, or the held-out Shakespeare works by default, and their names.

    Read before the model loads, so that empty or unreadable text is refused in a second, not after the model.
    """
    from tyr_core.calibration import load_documents
    from tyr_runtime.real_assets import resolve_corpus

    files = args.text or ([] if args.dataset else ["@shakespeare/heldout"])
    resolved = resolve_corpus(files, announce)
    docs = load_documents(resolved, args.dataset, args.dataset_config, args.split, args.text_field)
    return docs, files or [args.dataset]


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from tyr_core.calibration import eval_windows
    from tyr_core.evaluate import perplexity
    from tyr_core.param_count import count_module_params

    quiet_libraries()
    with refusing(), preparing() as announce:  # a first use fetches the texts or converts the model: say so
        docs, text = eval_documents(args, announce)
        model, tokenizer, folder = load_model_for_eval(args.model, args.dtype, args.trust_remote_code, announce)
        windows = eval_windows(tokenizer, docs, args.seq_len)[: args.max_windows]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    ppl = perplexity(model.to(device), windows)
    result = {
        "model": args.model,
        "folder": str(folder),
        "perplexity": ppl,
        "params": count_module_params(model),
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1)),
        "text": text,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if args.json:
        print_json(result)
    else:
        out_console.print(
            f"{args.model}: perplexity {ppl:,.3f} on {result['windows']} x {result['seq_len']} tokens of "
            f"{', '.join(map(str, text))}; {result['params']:,} parameters",
            highlight=False,
        )
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "eval",
        cmd_eval,
        "held-out perplexity and parameters of a model",
        "Perplexity (no BOS, non-overlapping windows) and parameter count of a local HF folder, a GGUF file, a hub "
        "name or a tyr export. Default text: the held-out Shakespeare works (never used for calibration).",
    )
    p.add_argument("model", metavar="MODEL", help="HF folder, .gguf file, hub name, smollm2-135m or tiny-random-llama")
    p.add_argument("--text", nargs="+", metavar="FILE", help="text files (.txt/.json/.jsonl/.parquet) or folders")
    p.add_argument("--dataset", metavar="NAME", help="a datasets name instead of files (needs a network)")
    p.add_argument("--dataset-config", metavar="NAME", help="the dataset's config, e.g. wikitext-2-raw-v1")
    p.add_argument("--split", default="test", help="the dataset's split (default test)")
    p.add_argument("--text-field", default="text", help="the field holding the text (default text)")
    p.add_argument("--seq-len", type=positive_int, default=512, metavar="N", help="tokens per window (default 512)")
    p.add_argument("--max-windows", type=positive_int, default=16, metavar="N", help="windows scored (default 16)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="weights' dtype (default float32)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off unless asked)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
