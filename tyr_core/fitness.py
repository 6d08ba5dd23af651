"""The search's fitness: KL(dense || candidate) on the dense model's top-k logits, renormalised (docs/algorithm.md).

The teacher's top-k is computed once, before the search, and kept on disk as fp16 values and int32 ids in
safetensors shards that are read lazily (top-8192 in fp32 for 4M tokens would be ~275 GB of RAM). Only the
windows a stage draws are read back. The candidate's logits are gathered at the teacher's ids, both sides are
renormalised over those k entries, and the per-token KL is averaged over tokens, the last position of each window
dropped, as the reference does.

Only the logits term is implemented. The paper's eq. 6 adds hidden-state distances of chosen layers with weights
it never gives; the reference and the paper's default use logits only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import NotRequired, TypedDict

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .errors import CalibrationError, MissingArtefactError, SearchError
from .keys import teacher_index_key, teacher_key
from .tensor_files import open_tensors

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # input ids (B, T) -> logits (B, T, V)
CandidateLogitsFn = Callable[[torch.Tensor, list[int]], torch.Tensor]  # (ids, levels now applied) -> logits
ApplyLevels = Callable[[list[int]], object]  # makes the resident model the candidate (swapping only the diff)

INDEX_FILE = PurePosixPath(teacher_index_key()).name  # names come from keys.py, the one key builder
_FP16_MAX = torch.finfo(torch.float16).max


class TeacherIndex(TypedDict):
    """``index.json`` of a teacher cache."""

    k: int  # logits kept per token, clamped to the vocabulary
    windows: int  # calibration windows covered, ids 0..windows-1
    windows_per_shard: int  # window w is row w % windows_per_shard of shard w // windows_per_shard
    shards: list[str]  # file names, relative to the cache folder
    seq_len: NotRequired[int]  # tokens per window
    vocab: NotRequired[int]  # vocabulary of the teacher's logits


def _require_windows(windows: torch.Tensor) -> None:
    if windows.ndim != 2 or windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise CalibrationError(
            f"calibration windows must be a 2-D integer tensor (N, T) of token ids, got {windows.dtype} "
            f"{tuple(windows.shape)}"
        )


def _shard_topk(
    logits_fn: LogitsFn, windows: torch.Tensor, k: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Top-k values (fp16) and ids (int32) of one shard's windows, ``batch_size`` windows per forward.

    Output tensors are allocated once per shard and filled in place, so memory stays at one shard plus one batch
    of logits.
    """
    n, seq_len = windows.shape
    values = ids = None
    vocab = 0
    for start in range(0, n, batch_size):
        batch = windows[start : start + batch_size]
        logits = logits_fn(batch)
        if logits.shape[:2] != batch.shape:
            raise ValueError(f"logits_fn returned {tuple(logits.shape)} for input ids {tuple(batch.shape)}")
        vocab = logits.shape[-1]
        top = torch.topk(logits, min(k, vocab), dim=-1)
        if values is None:
            shape = (n, seq_len, top.values.shape[-1])
            values = torch.empty(shape, dtype=torch.float16)
            ids = torch.empty(shape, dtype=torch.int32)
        # clamp before the fp16 cast: an inf teacher logit would make the KL NaN
        values[start : start + len(batch)] = top.values.float().clamp(-_FP16_MAX, _FP16_MAX)
        ids[start : start + len(batch)] = top.indices
    return values, ids, vocab


def write_teacher_topk(
    logits_fn: LogitsFn,
    windows: torch.Tensor,
    k: int,
    out_dir: Path,
    windows_per_shard: int = 64,
    batch_size: int = 4,
) -> TeacherIndex:
    """Run the dense model over ``windows`` and write its top-k logits per token to safetensors shards.

    Each shard is written as soon as its windows are done, so at most one shard's top-k is in memory. The index is
    written last: a folder without ``index.json`` is an unfinished cache.

    Args:
        logits_fn: the dense model, ``input_ids (B, T) -> logits (B, T, V)``; called under ``torch.inference_mode``.
        windows: calibration token ids ``(N, T)``; window ``w`` of the cache is row ``w``.
        k: logits kept per token (8192 in the reference); clamped to the vocabulary.
        out_dir: folder for the shards and ``index.json`` (created).
        windows_per_shard: windows per shard file.
        batch_size: windows per forward.

    Returns:
        The index, as written to ``index.json``.

    Raises:
        CalibrationError: if there are no windows or they are not integer token ids.
    """
    _require_windows(windows)
    if windows.shape[0] == 0:
        raise CalibrationError("no calibration windows to compute the teacher's top-k on")
    if min(k, windows_per_shard, batch_size) < 1:
        raise ValueError(f"k={k}, windows_per_shard={windows_per_shard} and batch_size={batch_size} must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, seq_len = windows.shape
    shards: list[str] = []
    kept, vocab = k, 0
    with torch.inference_mode():
        for shard, start in enumerate(range(0, n, windows_per_shard)):
            values, ids, vocab = _shard_topk(logits_fn, windows[start : start + windows_per_shard], k, batch_size)
            name = PurePosixPath(teacher_key(shard)).name
            save_file({"values": values.contiguous(), "ids": ids.contiguous()}, str(out_dir / name))
            shards.append(name)
            kept = values.shape[-1]
    index = TeacherIndex(
        k=kept, windows=n, windows_per_shard=windows_per_shard, shards=shards, seq_len=seq_len, vocab=vocab
    )
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return index


class TeacherTopK:
    """Lazy reader of a teacher cache: reads only the rows of the windows asked for (``safe_open`` slices).

    Raises:
        MissingArtefactError: if the folder has no ``index.json``.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        path = self.root / INDEX_FILE
        if not path.is_file():
            raise MissingArtefactError(f"teacher index {path} is missing: compute the teacher top-k first")
        self.index: TeacherIndex = json.loads(path.read_text())
        self.per_shard = self.index["windows_per_shard"]

    def __len__(self) -> int:
        return self.index["windows"]

    def get(self, window_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k of the given windows, in the order asked.

        Returns:
            ``(values fp16 (B, T, k), ids int32 (B, T, k))``.

        Raises:
            SearchError: if a window id is not in the cache.
            MissingArtefactError: if a shard file named in the index is missing.
        """
        rows: dict[int, list[tuple[int, int]]] = {}  # shard -> (position in the answer, row in the shard)
        for pos, window in enumerate(window_ids):
            if not 0 <= int(window) < len(self):
                raise SearchError(f"window {window} is not in the teacher cache (windows 0..{len(self) - 1})")
            shard, row = divmod(int(window), self.per_shard)
            rows.setdefault(shard, []).append((pos, row))
        values: list[torch.Tensor | None] = [None] * len(window_ids)
        ids: list[torch.Tensor | None] = [None] * len(window_ids)
        for shard, wanted in rows.items():  # each shard opened once per call
            self._read_rows(shard, wanted, values, ids)
        return torch.stack(values), torch.stack(ids)

    def _read_rows(
        self,
        shard: int,
        wanted: list[tuple[int, int]],
        values: list[torch.Tensor | None],
        ids: list[torch.Tensor | None],
    ) -> None:
        path = self.root / self.index["shards"][shard]
        if not path.is_file():
            raise MissingArtefactError(f"teacher shard {path} is missing: fetch it or recompute the teacher")
        with open_tensors(path, f"teacher shard {self.index['shards'][shard]!r}") as f:
            value_rows, id_rows = f.get_slice("values"), f.get_slice("ids")
            for pos, row in wanted:
                values[pos] = value_rows[row : row + 1][0]
                ids[pos] = id_rows[row : row + 1][0]


def topk_kl(teacher_vals: torch.Tensor, teacher_ids: torch.Tensor, student_logits: torch.Tensor) -> tuple[float, int]:
    """Summed per-token KL(teacher || student) over the teacher's top-k entries, renormalised, and its token count.

    Both distributions are ``log_softmax`` over the same k entries only, in fp32 (docs/algorithm.md). The last
    position of each window is dropped, as the reference does. With k = vocabulary this is the full-vocabulary KL.

    Args:
        teacher_vals: ``(B, T, k)`` teacher logits (fp16 from the cache).
        teacher_ids: ``(B, T, k)`` their vocabulary ids.
        student_logits: ``(B, T, V)`` candidate logits.

    Returns:
        ``(sum of the per-token KL, tokens counted)``; divide to get the token-weighted mean.
    """
    if teacher_vals.shape != teacher_ids.shape or teacher_vals.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"teacher values {tuple(teacher_vals.shape)}, ids {tuple(teacher_ids.shape)} and student logits "
            f"{tuple(student_logits.shape)} must share (B, T), and values and ids their k"
        )
    teacher = teacher_vals[:, :-1].float()
    student = torch.gather(student_logits[:, :-1], -1, teacher_ids[:, :-1].long()).float()
    log_t, log_s = F.log_softmax(teacher, dim=-1), F.log_softmax(student, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return float(kl.sum()), kl.numel()


class KLEvaluator:
    """The search's fitness: apply a candidate, then its token-weighted mean top-k KL on the given windows.

    Called as ``evaluate(levels, window_ids)`` it scores one candidate batch after batch. ``pool(candidates,
    window_ids)`` scores a whole pool batch-major: every candidate on a batch, then the next batch. Each
    candidate's (KL sum, tokens) still add up in window order, so both give the same bits; batch-major reads each
    teacher batch once and keeps the shared prefix of just one batch hot, which is what large stages and
    several devices need.
    """

    def __init__(
        self,
        apply_levels: ApplyLevels,
        logits_fn: CandidateLogitsFn,
        windows: torch.Tensor,
        teacher: TeacherTopK,
        batch_size: int = 4,
    ):
        _require_windows(windows)
        if windows.shape[1] < 2:
            raise SearchError("windows need at least 2 tokens: the KL drops the last position of each")
        if windows.shape[0] > len(teacher):
            raise SearchError(f"{windows.shape[0]} windows but the teacher cache covers only {len(teacher)}")
        if teacher.index.get("seq_len", windows.shape[1]) != windows.shape[1]:
            raise SearchError(f"windows of {windows.shape[1]} tokens but the teacher saw {teacher.index['seq_len']}")
        self.apply_levels, self.logits_fn = apply_levels, logits_fn
        self.windows, self.teacher, self.batch_size = windows, teacher, batch_size
        self.tokens_scored = 0  # candidate tokens scored so far, for reports of what a step cost

    def __call__(self, levels: list[int], window_ids: list[int]) -> float:
        return self.pool([levels], window_ids)[0]

    def batch_terms(self, candidates: Sequence[list[int]], batch: list[int]) -> list[tuple[float, int]]:
        """(KL sum, tokens) of every candidate on one batch of windows: the unit a replica works on."""
        values, ids = self.teacher.get(batch)
        terms = []
        for levels in candidates:
            self.apply_levels(list(levels))
            with torch.inference_mode():
                logits = self.logits_fn(self.windows[batch], list(levels))
                terms.append(topk_kl(values.to(logits.device), ids.to(logits.device), logits))
            self.tokens_scored += len(batch) * self.windows.shape[1]
        return terms

    def pool_windows(self, candidates: Sequence[list[int]], window_ids: list[int]) -> list[list[float]]:
        """Every candidate's mean KL on each window apart (``[candidate][window]``), for paired comparisons."""
        if not window_ids:
            raise SearchError("a candidate must be scored on at least one window")
        scores: list[list[float]] = [[] for _ in candidates]
        for start in range(0, len(window_ids), self.batch_size):
            batch = list(window_ids[start : start + self.batch_size])
            values, ids = self.teacher.get(batch)
            for j, levels in enumerate(candidates):
                self.apply_levels(list(levels))
                with torch.inference_mode():
                    logits = self.logits_fn(self.windows[batch], list(levels))
                    self.tokens_scored += len(batch) * self.windows.shape[1]
                    v, i = values.to(logits.device), ids.to(logits.device)
                    for b in range(len(batch)):
                        kl, n = topk_kl(v[b : b + 1], i[b : b + 1], logits[b : b + 1])
                        scores[j].append(kl / n)
        return scores

    def pool(self, candidates: Sequence[list[int]], window_ids: list[int]) -> list[float]:
        """Fitness of every candidate on ``window_ids``, in the pool's order."""
        if not window_ids:
            raise SearchError("a candidate must be scored on at least one window")
        totals, tokens = [0.0] * len(candidates), [0] * len(candidates)
        for start in range(0, len(window_ids), self.batch_size):
            batch = list(window_ids[start : start + self.batch_size])
            for j, (kl, n) in enumerate(self.batch_terms(candidates, batch)):
                totals[j], tokens[j] = totals[j] + kl, tokens[j] + n
        return [t / n for t, n in zip(totals, tokens, strict=True)]


def make_kl_evaluator(
    apply_levels: ApplyLevels,
    logits_fn: CandidateLogitsFn,
    windows: torch.Tensor,
    teacher: TeacherTopK,
    batch_size: int = 4,
) -> KLEvaluator:
    """A ``KLEvaluator`` for the search (see its docstring).

    Args:
        apply_levels: makes the resident model the candidate (``SupernetModel.apply`` swaps only changed
            sublayers); called outside inference mode since it writes parameters.
        logits_fn: ``(input_ids (B, T), levels) -> logits (B, T, V)`` of the resident model, whose weights are
            ``levels`` (``PrefixForward.logits`` uses them to share the parent's unchanged layers; a plain model
            ignores them: ``lambda ids, _levels: model(ids).logits``).
        windows: calibration token ids ``(N, T)``, the windows the teacher cache was computed on, in its order.
        teacher: the dense model's cached top-k.
        batch_size: windows per forward.

    Raises:
        SearchError: if the windows do not match the teacher cache.
    """
    return KLEvaluator(apply_levels, logits_fn, windows, teacher, batch_size)
