"""Calibration and evaluation text: documents from a dataset name or local files, tokenised without BOS, cut into
sequences by one of two chunkings (docs/algorithm.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import CalibrationError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_LOADERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _local_files(paths: list[str]) -> tuple[str, list[str]]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in _LOADERS)
        elif p.is_file():
            files.append(p)
        else:
            raise CalibrationError(f"calibration file {p} does not exist")
    if not files:
        raise CalibrationError(f"no .txt/.json/.jsonl/.parquet files found in {paths}")
    kinds = {_LOADERS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise CalibrationError(
            f"calibration files must all be one of {sorted(set(_LOADERS))}; got {sorted({f.suffix for f in files})}"
        )
    return kinds.pop(), [str(f) for f in files]


def iter_documents(
    files: list[str] | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    data_files: list[str] | None = None,
) -> Iterator[str]:
    """Non-empty documents, lazily, from local files (a .txt file is one document) or a dataset name (streamed;
    FineWeb-Edu style). Lazy because reference chunking needs the first 2^22 tokens of a dataset shard (16 MB of
    text), not the shard (a FineWeb-Edu sample-10BT file holds gigabytes).

    Raises:
        CalibrationError: missing files, unreadable text, no ``text_field`` column, or no non-empty document.
    """
    from datasets import load_dataset

    source = files or dataset
    found = False
    try:
        if files:
            builder, paths = _local_files(files)
            extra = {"sample_by": "document"} if builder == "text" else {}
            ds = load_dataset(builder, data_files=paths, split="train", **extra)
        elif dataset:
            ds = load_dataset(dataset, dataset_config, split=split, data_files=data_files, streaming=True)
        else:
            raise CalibrationError("calibration needs either files or a dataset name")
        for row in ds:
            doc = row[text_field]
            if isinstance(doc, str) and doc.strip():
                found = True
                yield doc
    except CalibrationError:
        raise
    except KeyError as err:
        raise CalibrationError(f"calibration data has no {text_field!r} field ({err})") from err
    except Exception as err:  # datasets raises many types for unreadable input
        raise CalibrationError(f"could not read calibration data {source}: {err}") from err
    if not found:
        raise CalibrationError(f"calibration data {source} holds no non-empty text documents")


def load_documents(*args: Any, **kwargs: Any) -> list[str]:
    """Every document of :func:`iter_documents` (same arguments), in a list: held-out text, which is read whole."""
    return list(iter_documents(*args, **kwargs))


def tokenize(
    tokenizer: PreTrainedTokenizerBase, docs: Iterable[str], batch_chars: int = 1 << 20
) -> Iterator[list[int]]:
    """Token ids of each document, with no special tokens (no BOS: docs/algorithm.md).

    Documents go to the tokenizer in batches of about ``batch_chars`` characters: a fast tokenizer encodes a batch
    on all cores (8.5 MB of Shakespeare: 7.8 s one document at a time, 4.0 s in batches on 2 cores), and the
    stream stays lazy, so reference chunking still stops reading once it has its tokens.
    """
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= batch_chars:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch, size = [], 0
    if batch:
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def reference_chunks(token_docs: Iterable[list[int]], seq_len: int, num_tokens: int) -> list[torch.Tensor]:
    """The reference's chunking: each document cut into ``seq_len`` pieces with its shorter tail kept, until
    exactly ``num_tokens`` tokens are taken (the last piece is truncated)."""
    out, taken = [], 0
    for ids in token_docs:
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len][: num_tokens - taken]
            if piece:
                out.append(torch.tensor(piece, dtype=torch.long))
                taken += len(piece)
            if taken >= num_tokens:
                return out
    return out


def packed_windows(
    token_docs: Iterable[list[int]], seq_len: int, num_windows: int, seed: int, sep: int | None
) -> torch.Tensor:
    """Documents joined (``sep`` between them), cut into non-overlapping ``seq_len`` windows, seeded shuffle,
    first ``num_windows``. Returns ``(num_windows, seq_len)`` token ids (fewer if the text is short)."""
    stream: list[int] = []
    for ids in token_docs:
        stream += ids + ([sep] if sep is not None else [])
    n = len(stream) // seq_len
    if n == 0:
        raise CalibrationError(f"calibration text has {len(stream)} tokens, fewer than one window of {seq_len}")
    windows = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    order = np.random.default_rng(seed).permutation(n)[:num_windows]
    return windows[torch.from_numpy(order)]


def eval_windows(tokenizer: PreTrainedTokenizerBase, docs: list[str], seq_len: int) -> torch.Tensor:
    """Held-out evaluation windows: documents joined with a blank line, non-overlapping, remainder dropped."""
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise CalibrationError(f"evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
