"""Calibration and evaluation text: documents from a dataset name or local files, tokenised without BOS, cut into
sequences by one of two chunkings (docs/algorithm.md).
"""

from __future__ import annotations

import logging
from collections import deque
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


PIECE_CHARS = 1 << 20
"""Longest text handed to the tokenizer at once: a fast tokenizer holds about 150 bytes per token of its input
(an 8 MB document took 1.8 GB), so longer documents are read and tokenised in pieces cut after a line break."""

STREAM_TOKENS = 1 << 22
"""Tokens that packed chunking reads before it stops (16 MiB as int32): it draws its windows from the first
``max(STREAM_TOKENS, windows * seq_len)`` tokens of the text, so memory does not grow with the corpus."""


def _cut(text: str, limit: int) -> int:
    """Where a piece of at most ``limit`` characters ends: after the last line break, else the last space, else at
    ``limit`` (one line longer than a piece)."""
    for sep in ("\n", " "):
        at = text.rfind(sep, 0, limit)
        if at >= 0:
            return at + 1
    return limit


def split_text(text: str, limit: int = PIECE_CHARS) -> Iterator[tuple[str, bool]]:
    """``text`` as ``(piece, is_last)`` pieces of at most ``limit`` characters; one piece when it fits."""
    while len(text) > limit:
        at = _cut(text, limit)
        yield text[:at], False
        text = text[at:]
    yield text, True


def _read_text_file(path: str, limit: int) -> Iterator[tuple[str, bool]]:
    """A .txt file as one document, read ``limit`` characters at a time: the text ``datasets`` reads with
    ``sample_by="document"`` (UTF-8, universal newlines), never whole in memory."""
    with open(path, encoding="utf-8") as f:
        carry = ""
        while True:
            text = carry + f.read(limit - len(carry))
            ahead = f.read(1)  # a file of exactly ``limit`` characters is still one piece
            if not ahead:
                yield from split_text(text, limit)
                return
            at = _cut(text, limit)
            yield text[:at], False
            carry = text[at:] + ahead


def iter_pieces(
    files: list[str] | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    data_files: list[str] | None = None,
    piece_chars: int | None = None,
) -> Iterator[tuple[str, bool]]:
    """Non-empty documents, lazily, as ``(piece, is_last_piece_of_its_document)``: a document longer than
    ``piece_chars`` (default :data:`PIECE_CHARS`) comes in pieces cut after a line break, others whole. Local files
    (a .txt file is one document, read piece by piece) or a dataset name (streamed; FineWeb-Edu style). Lazy
    because chunking needs the first tokens of a dataset shard (16 MB of text), not the shard (a FineWeb-Edu
    sample-10BT file holds gigabytes).

    Raises:
        CalibrationError: missing files, unreadable text, no ``text_field`` column, or no non-empty document.
    """
    source = files or dataset
    found = False
    piece_chars = piece_chars or PIECE_CHARS
    try:
        if files:
            builder, paths = _local_files(files)
            if builder == "text":
                docs: Iterable[Iterable[tuple[str, bool]]] = (_read_text_file(p, piece_chars) for p in paths)
            else:
                rows = _rows(builder, paths, None, "train", None, text_field)
                docs = (split_text(text, piece_chars) for text in rows)
        elif dataset:
            docs = (
                split_text(text, piece_chars)
                for text in _rows(dataset, None, dataset_config, split, data_files, text_field, streaming=True)
            )
        else:
            raise CalibrationError("calibration needs either files or a dataset name")
        for pieces in docs:
            pieces = iter(pieces)
            first, last = next(pieces)
            if last and not first.strip():
                continue  # a whitespace-only document (a longer one is read, never held, whole)
            found = True
            yield first, last
            yield from pieces
    except CalibrationError:
        raise
    except KeyError as err:
        raise CalibrationError(f"calibration data has no {text_field!r} field ({err})") from err
    except Exception as err:  # datasets raises many types for unreadable input
        raise CalibrationError(f"could not read calibration data {source}: {err}") from err
    if not found:
        raise CalibrationError(f"calibration data {source} holds no non-empty text documents")


def _rows(
    name: str,
    paths: list[str] | None,
    config: str | None,
    split: str,
    data_files: list[str] | None,
    text_field: str,
    streaming: bool = False,
) -> Iterator[str]:
    from datasets import load_dataset

    kwargs: dict[str, Any] = {"streaming": True} if streaming else {}
    ds = load_dataset(name, config, split=split, data_files=paths or data_files, **kwargs)
    for row in ds:
        doc = row[text_field]
        if isinstance(doc, str):
            yield doc


def iter_documents(
    files: list[str] | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    data_files: list[str] | None = None,
) -> Iterator[str]:
    """Non-empty documents of :func:`iter_pieces` (same arguments), each whole.

    Raises:
        CalibrationError: missing files, unreadable text, no ``text_field`` column, or no non-empty document.
    """
    parts: list[str] = []
    for piece, last in iter_pieces(files, dataset, dataset_config, split, text_field, data_files):
        parts.append(piece)
        if last:
            yield "".join(parts)
            parts = []


def load_documents(*args: Any, **kwargs: Any) -> list[str]:
    """Every document of :func:`iter_documents` (same arguments), in a list: held-out text, which is read whole."""
    return list(iter_documents(*args, **kwargs))


def tokenize(
    tokenizer: PreTrainedTokenizerBase, docs: Iterable[str], batch_chars: int | None = None
) -> Iterator[list[int]]:
    """Token ids of each document, with no special tokens (no BOS: docs/algorithm.md).

    Documents go to the tokenizer in batches of about ``batch_chars`` characters: a fast tokenizer encodes a batch
    on all cores (8.5 MB of Shakespeare: 7.8 s one document at a time, 4.0 s in batches on 2 cores), and the
    stream stays lazy, so chunking still stops reading once it has its tokens. ``batch_chars`` defaults to
    :data:`PIECE_CHARS`.
    """
    batch_chars = batch_chars or PIECE_CHARS
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


def tokenize_pieces(
    tokenizer: PreTrainedTokenizerBase, pieces: Iterable[tuple[str, bool]], batch_chars: int | None = None
) -> Iterator[tuple[list[int], bool]]:
    """:func:`tokenize` of :func:`iter_pieces`' pieces, each with its ``is_last`` flag."""
    flags: deque[bool] = deque()

    def texts() -> Iterator[str]:
        for text, last in pieces:
            flags.append(last)
            yield text

    for ids in tokenize(tokenizer, texts(), batch_chars):
        yield ids, flags.popleft()


def join_pieces(token_pieces: Iterable[tuple[list[int], bool]], max_tokens: int) -> Iterator[list[int]]:
    """Each document's token ids, its pieces joined, until ``max_tokens`` tokens are out (the last one cut short),
    so a long document is never held beyond what is needed."""
    doc: list[int] = []
    out = 0
    for ids, last in token_pieces:
        doc += ids[: max_tokens - out - len(doc)]
        if last or out + len(doc) >= max_tokens:
            yield doc
            out += len(doc)
            doc = []
            if out >= max_tokens:
                return


def packed_windows(
    token_docs: Iterable[list[int]],
    seq_len: int,
    num_windows: int,
    seed: int,
    sep: int | None,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Documents joined (``sep`` after each), cut into non-overlapping ``seq_len`` windows, seeded shuffle, first
    ``num_windows``. Returns ``(num_windows, seq_len)`` token ids (fewer if the text is short).

    Tokens stream into a fixed int32 buffer of ``max(max_tokens, num_windows * seq_len)`` (default
    :data:`STREAM_TOKENS`) and reading stops once it is full: a text that fits gives the windows of the whole text,
    a longer one those of its first tokens.
    """
    buffer = np.empty(max(max_tokens or STREAM_TOKENS, num_windows * seq_len), dtype=np.int32)
    filled = 0
    for ids in token_docs:
        run = ids + [sep] if sep is not None else ids
        take = min(len(run), buffer.size - filled)
        buffer[filled : filled + take] = run[:take]
        filled += take
        if filled == buffer.size:
            log.info("calibration: windows drawn from the first %d tokens of the text", filled)
            break
    n = filled // seq_len
    if n == 0:
        raise CalibrationError(f"calibration text has {filled} tokens, fewer than one window of {seq_len}")
    order = np.random.default_rng(seed).permutation(n)[:num_windows]
    windows = buffer[: n * seq_len].reshape(n, seq_len)[order]
    return torch.from_numpy(windows.astype(np.int64))


def eval_windows(
    tokenizer: PreTrainedTokenizerBase, docs: Iterable[str], seq_len: int, max_windows: int | None = None
) -> torch.Tensor:
    """Held-out evaluation windows: documents joined with a blank line, non-overlapping, remainder dropped, the
    first ``max_windows`` (all without it). :func:`heldout_windows` of whole documents."""
    return heldout_windows(tokenizer, ((doc, True) for doc in docs), seq_len, max_windows)


def heldout_windows(
    tokenizer: PreTrainedTokenizerBase,
    pieces: Iterable[tuple[str, bool]],
    seq_len: int,
    max_windows: int | None = None,
    piece_chars: int | None = None,
) -> torch.Tensor:
    """:func:`eval_windows` of :func:`iter_pieces`' pieces, read lazily.

    The joined text goes to the tokenizer in pieces of at most ``piece_chars`` characters (one piece when it fits)
    and reading stops once ``max_windows`` windows are tokenised, so a large held-out corpus is never held whole.

    Raises:
        CalibrationError: if the text holds less than one window.
    """
    needed = max_windows * seq_len if max_windows is not None else None
    ids: list[int] = []
    for piece in _joined_pieces(pieces, "\n\n", piece_chars or PIECE_CHARS):
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        if needed is not None and len(ids) > needed + seq_len:  # a margin past the last window: its tokens settled
            break
    n = len(ids) // seq_len
    if n == 0:
        raise CalibrationError(f"evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _joined_pieces(pieces: Iterable[tuple[str, bool]], sep: str, limit: int) -> Iterator[str]:
    """The documents' text joined with ``sep``, in pieces of at most ``limit`` characters cut after a line break
    (whole when it fits)."""
    pending = ""
    new_doc = False
    for piece, last in pieces:
        pending += (sep if new_doc else "") + piece
        new_doc = last
        while len(pending) > limit:
            at = _cut(pending, limit)
            yield pending[:at]
            pending = pending[at:]
    if pending:
        yield pending
