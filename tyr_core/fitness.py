"""The search's fitness: KL(dense || candidate) on the dense model's top-k logits, renormalised (docs/algorithm.md).

The teacher's top-k is computed once, before the search, and kept on disk as fp16 values and int32 ids in
safetensors shards that are read lazily (top-8192 in fp32 for 4M tokens would be ~275 GB of RAM). Only the
windows a stage draws are read back. The candidate's logits are gathered at the teacher's ids, both sides are
renormalised over those k entries, and the per-token KL is averaged over tokens, the last position of each window
dropped, as the reference does.

The paper's eq. 6 adds distances between the dense and the candidate's hidden states at chosen decoder layers, with
weights it never gives; the reference uses logits only. Here that term is a setting (``search.hidden_weight``): the
teacher cache then also keeps the dense outputs of ``search.hidden_layers`` (fp16), and each token adds the weight
times its relative squared error ``||h_dense - h||^2 / ||h_dense||^2``, averaged over those layers, to its KL.
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
Captured = Callable[[], "torch.Tensor | None"]  # hidden states (B, H, T, d) of the last forward's captured layers
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
    hidden_layers: NotRequired[list[int]]  # decoder layers whose dense outputs the shards keep as ``hidden``


def _require_windows(windows: torch.Tensor) -> None:
    if windows.ndim != 2 or windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise CalibrationError(
            f"calibration windows must be a 2-D integer tensor (N, T) of token ids, got {windows.dtype} "
            f"{tuple(windows.shape)}"
        )


def _shard_topk(
    logits_fn: LogitsFn, windows: torch.Tensor, k: int, batch_size: int, captured: Captured | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """Top-k values (fp16) and ids (int32) of one shard's windows, ``batch_size`` windows per forward, and with
    ``captured`` the hidden states (fp16) each forward kept.

    Output tensors are allocated once per shard and filled in place, so memory stays at one shard plus one batch
    of logits.
    """
    n, seq_len = windows.shape
    out: dict[str, torch.Tensor] = {}
    vocab = 0
    for start in range(0, n, batch_size):
        batch = windows[start : start + batch_size]
        logits = logits_fn(batch)
        if logits.shape[:2] != batch.shape:
            raise ValueError(f"logits_fn returned {tuple(logits.shape)} for input ids {tuple(batch.shape)}")
        vocab = logits.shape[-1]
        top = torch.topk(logits, min(k, vocab), dim=-1)
        hidden = captured() if captured is not None else None
        if not out:
            shape = (n, seq_len, top.values.shape[-1])
            out["values"] = torch.empty(shape, dtype=torch.float16)
            out["ids"] = torch.empty(shape, dtype=torch.int32)
            if hidden is not None:
                out["hidden"] = torch.empty((n, *hidden.shape[1:]), dtype=torch.float16)
        rows = slice(start, start + len(batch))
        # clamp before the fp16 cast: an inf teacher logit would make the KL NaN
        out["values"][rows] = top.values.float().clamp(-_FP16_MAX, _FP16_MAX)
        out["ids"][rows] = top.indices
        if hidden is not None:
            out["hidden"][rows] = hidden.float().clamp(-_FP16_MAX, _FP16_MAX)
    return out, vocab


def write_teacher_topk(
    logits_fn: LogitsFn,
    windows: torch.Tensor,
    k: int,
    out_dir: Path,
    windows_per_shard: int = 64,
    batch_size: int = 4,
    captured: Captured | None = None,
    hidden_layers: Sequence[int] = (),
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
        captured: with ``hidden_layers``, returns the outputs of those decoder layers of the last ``logits_fn``
            call, ``(B, len(hidden_layers), T, d)`` (``PrefixForward.captured``); the shards keep them as ``hidden``.
        hidden_layers: the decoder layers ``captured`` returns, recorded in the index.

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
    if bool(hidden_layers) != (captured is not None):
        raise ValueError("hidden_layers and captured go together: give both to keep hidden states, or neither")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, seq_len = windows.shape
    shards: list[str] = []
    kept, vocab = k, 0
    with torch.inference_mode():
        for shard, start in enumerate(range(0, n, windows_per_shard)):
            part = windows[start : start + windows_per_shard]
            tensors, vocab = _shard_topk(logits_fn, part, k, batch_size, captured)
            if hidden_layers and tensors["hidden"].shape[1] != len(hidden_layers):
                raise ValueError(f"captured {tensors['hidden'].shape[1]} layers, hidden_layers names {hidden_layers}")
            name = PurePosixPath(teacher_key(shard)).name
            save_file({key: t.contiguous() for key, t in tensors.items()}, str(out_dir / name))
            shards.append(name)
            kept = tensors["values"].shape[-1]
    index = TeacherIndex(
        k=kept, windows=n, windows_per_shard=windows_per_shard, shards=shards, seq_len=seq_len, vocab=vocab
    )
    if hidden_layers:
        index["hidden_layers"] = [int(j) for j in hidden_layers]
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

    @property
    def hidden_layers(self) -> list[int]:
        """Decoder layers whose dense outputs the cache keeps (empty: logits only)."""
        return list(self.index.get("hidden_layers", []))

    def get(self, window_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k of the given windows, in the order asked.

        Returns:
            ``(values fp16 (B, T, k), ids int32 (B, T, k))``.

        Raises:
            SearchError: if a window id is not in the cache.
            MissingArtefactError: if a shard file named in the index is missing.
        """
        values, ids = self._rows(window_ids, ("values", "ids"))
        return values, ids

    def hidden(self, window_ids: Sequence[int]) -> torch.Tensor:
        """The dense model's outputs of ``hidden_layers`` on the given windows, fp16 ``(B, H, T, d)``.

        Raises:
            SearchError: if the cache keeps no hidden states or a window id is not in it.
        """
        if not self.hidden_layers:
            raise SearchError(
                f"the teacher cache {self.root} keeps no hidden states: it was computed with search.hidden_weight=0"
            )
        return self._rows(window_ids, ("hidden",))[0]

    def _rows(self, window_ids: Sequence[int], names: tuple[str, ...]) -> list[torch.Tensor]:
        rows: dict[int, list[tuple[int, int]]] = {}  # shard -> (position in the answer, row in the shard)
        for pos, window in enumerate(window_ids):
            if not 0 <= int(window) < len(self):
                raise SearchError(f"window {window} is not in the teacher cache (windows 0..{len(self) - 1})")
            shard, row = divmod(int(window), self.per_shard)
            rows.setdefault(shard, []).append((pos, row))
        found: dict[str, list[torch.Tensor | None]] = {name: [None] * len(window_ids) for name in names}
        for shard, wanted in rows.items():  # each shard opened once per call
            path = self.root / self.index["shards"][shard]
            if not path.is_file():
                raise MissingArtefactError(f"teacher shard {path} is missing: fetch it or recompute the teacher")
            with open_tensors(path, f"teacher shard {self.index['shards'][shard]!r}") as f:
                for name in names:
                    sliced = f.get_slice(name)
                    for pos, row in wanted:
                        found[name][pos] = sliced[row : row + 1][0]
        return [torch.stack(found[name]) for name in names]


def hidden_error(teacher_hidden: torch.Tensor, student_hidden: torch.Tensor) -> tuple[float, int]:
    """Summed per-token relative squared error of the hidden states, averaged over layers, and its token count.

    Per token: the mean over the captured layers of ``||h_dense - h||^2 / ||h_dense||^2`` (scale-free, so one weight
    fits every layer and model), in fp32, the last position of each window dropped as in ``topk_kl``.

    Args:
        teacher_hidden: ``(B, H, T, d)`` dense outputs (fp16 from the cache).
        student_hidden: ``(B, H, T, d)`` the candidate's outputs of the same layers.
    """
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(
            f"teacher hidden states {tuple(teacher_hidden.shape)} and the candidate's "
            f"{tuple(student_hidden.shape)} must have the same shape"
        )
    dense = teacher_hidden[:, :, :-1].float()
    diff = student_hidden[:, :, :-1].float() - dense
    per = diff.pow(2).sum(-1) / dense.pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    per_token = per.mean(dim=1)  # (B, T-1)
    return float(per_token.sum()), per_token.numel()


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
    """The search's fitness: apply a candidate, then its token-weighted mean top-k KL on the given windows, plus
    ``hidden_weight`` times its hidden-state error (``hidden_error``) when that weight is positive (eq. 6).

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
        hidden_weight: float = 0.0,
        captured: Captured | None = None,
    ):
        _require_windows(windows)
        if windows.shape[1] < 2:
            raise SearchError("windows need at least 2 tokens: the KL drops the last position of each")
        if windows.shape[0] > len(teacher):
            raise SearchError(f"{windows.shape[0]} windows but the teacher cache covers only {len(teacher)}")
        if teacher.index.get("seq_len", windows.shape[1]) != windows.shape[1]:
            raise SearchError(f"windows of {windows.shape[1]} tokens but the teacher saw {teacher.index['seq_len']}")
        if hidden_weight < 0:
            raise SearchError(f"hidden_weight={hidden_weight} must be >= 0")
        if hidden_weight > 0 and (captured is None or not teacher.hidden_layers):
            raise SearchError(
                "search.hidden_weight > 0 needs the dense hidden states in the teacher cache and the candidate's "
                "forward capturing the same layers: recompute the teacher with the same search.hidden_layers"
            )
        self.apply_levels, self.logits_fn = apply_levels, logits_fn
        self.windows, self.teacher, self.batch_size = windows, teacher, batch_size
        self.hidden_weight, self.captured = hidden_weight, captured
        self.tokens_scored = 0  # candidate tokens scored so far, for reports of what a step cost

    def __call__(self, levels: list[int], window_ids: list[int]) -> float:
        return self.pool([levels], window_ids)[0]

    def _candidate_terms(
        self, levels: list[int], batch: list[int], teacher: tuple, per_window: bool
    ) -> list[tuple[float, int]]:
        """(fitness sum, tokens) of one candidate on ``batch``, as one term or one per window; ``teacher`` holds
        that batch's cached values, ids and (with the hidden term) hidden states."""
        self.apply_levels(list(levels))
        with torch.inference_mode():
            logits = self.logits_fn(self.windows[batch], list(levels))
            self.tokens_scored += len(batch) * self.windows.shape[1]
            values, ids = teacher[0].to(logits.device), teacher[1].to(logits.device)
            hidden = dense_hidden = None
            if self.hidden_weight > 0:
                hidden = self.captured()
                dense_hidden = teacher[2].to(hidden.device)
            parts = [slice(b, b + 1) for b in range(len(batch))] if per_window else [slice(None)]
            terms = []
            for part in parts:
                kl, n = topk_kl(values[part], ids[part], logits[part])
                if hidden is not None:
                    kl += self.hidden_weight * hidden_error(dense_hidden[part], hidden[part])[0]
                terms.append((kl, n))
        return terms

    def _teacher_batch(self, batch: list[int]) -> tuple:
        values, ids = self.teacher.get(batch)
        return (values, ids, self.teacher.hidden(batch)) if self.hidden_weight > 0 else (values, ids)

    def batch_terms(self, candidates: Sequence[list[int]], batch: list[int]) -> list[tuple[float, int]]:
        """(fitness sum, tokens) of every candidate on one batch of windows: the unit a replica works on."""
        teacher = self._teacher_batch(batch)
        return [self._candidate_terms(levels, batch, teacher, per_window=False)[0] for levels in candidates]

    def pool_windows(self, candidates: Sequence[list[int]], window_ids: list[int]) -> list[list[float]]:
        """Every candidate's mean fitness on each window apart (``[candidate][window]``), for paired comparisons."""
        if not window_ids:
            raise SearchError("a candidate must be scored on at least one window")
        scores: list[list[float]] = [[] for _ in candidates]
        for start in range(0, len(window_ids), self.batch_size):
            batch = list(window_ids[start : start + self.batch_size])
            teacher = self._teacher_batch(batch)
            for j, levels in enumerate(candidates):
                scores[j].extend(kl / n for kl, n in self._candidate_terms(levels, batch, teacher, per_window=True))
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
    hidden_weight: float = 0.0,
    captured: Captured | None = None,
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
        hidden_weight: weight of the hidden-state term (eq. 6); 0 scores the logits only (the reference).
        captured: with a positive weight, the candidate's outputs of the teacher's ``hidden_layers`` after each
            ``logits_fn`` call (``PrefixForward.captured``).

    Raises:
        SearchError: if the windows do not match the teacher cache, or the hidden term has no hidden states.
    """
    return KLEvaluator(apply_levels, logits_fn, windows, teacher, batch_size, hidden_weight, captured)
