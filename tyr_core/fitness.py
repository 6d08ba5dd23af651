"""The search's fitness: KL(dense || candidate) over the dense model's top-k logits, renormalised (ALGORITHM.md
§6.4). The teacher's top-k is computed once and kept on disk as fp16 values and int32 ids, in shards read lazily.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import MissingArtefactError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (B, T) ids -> (B, T, V) logits


def write_teacher_topk(
    logits_fn: LogitsFn, windows: torch.Tensor, k: int, out_dir: Path, windows_per_shard: int = 64, batch_size: int = 4
) -> dict:
    """Run the dense model over ``windows`` and write its top-k per token to shards; returns the index.

    Only one shard's top-k is in memory at a time.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    n = windows.shape[0]
    with torch.inference_mode():
        for shard, start in enumerate(range(0, n, windows_per_shard)):
            vals, ids = [], []
            for b in range(start, min(start + windows_per_shard, n), batch_size):
                logits = logits_fn(windows[b : min(b + batch_size, start + windows_per_shard, n)]).float()
                top = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)
                vals.append(top.values.half())
                ids.append(top.indices.int())
            name = f"topk-{shard:05d}.safetensors"
            save_file({"values": torch.cat(vals), "ids": torch.cat(ids)}, str(out_dir / name))
            shards.append(name)
    index = {
        "k": int(min(k, vals[0].shape[-1])) if n else k,
        "windows": n,
        "windows_per_shard": windows_per_shard,
        "shards": shards,
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=1))
    return index


class TeacherTopK:
    """Lazy reader of the teacher cache written by ``write_teacher_topk``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        path = self.root / "index.json"
        if not path.is_file():
            raise MissingArtefactError(f"teacher index {path} is missing: compute the teacher top-k first")
        self.index = json.loads(path.read_text())
        self.per_shard = self.index["windows_per_shard"]

    def get(self, window_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(values fp16 ``(B, T, k)``, ids int32 ``(B, T, k)``) of the given windows."""
        vals, ids = [], []
        for w in window_ids:
            shard, row = divmod(int(w), self.per_shard)
            with safe_open(str(self.root / self.index["shards"][shard]), "pt") as f:
                vals.append(f.get_slice("values")[row : row + 1])
                ids.append(f.get_slice("ids")[row : row + 1])
        return torch.cat(vals), torch.cat(ids)


def topk_kl(teacher_vals: torch.Tensor, teacher_ids: torch.Tensor, student_logits: torch.Tensor):
    """(sum of per-token KL(teacher || student) over the teacher's top-k, renormalised; tokens counted).

    The last position of each window is dropped, as in the reference. Computed in fp32.
    """
    t = teacher_vals[:, :-1].float()
    s = torch.gather(student_logits[:, :-1].float(), -1, teacher_ids[:, :-1].long())
    log_t, log_s = F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return float(kl.sum()), int(kl.numel())


def make_kl_evaluator(
    apply_levels: Callable[[list[int]], object],
    logits_fn: Callable[[torch.Tensor, list[int]], torch.Tensor],
    windows: torch.Tensor,
    teacher: TeacherTopK,
    batch_size: int = 4,
) -> Callable[[list[int], list[int]], float]:
    """An ``Evaluate`` for the search: apply the candidate, then the token-weighted mean top-k KL on the windows.

    ``logits_fn(ids, levels)`` computes the resident model's logits (``PrefixForward.logits`` shares the parent's
    unchanged layers).
    """

    def evaluate(levels: list[int], window_ids: list[int]) -> float:
        apply_levels(levels)
        total, tokens = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(window_ids), batch_size):
                ids = window_ids[i : i + batch_size]
                vals, top = teacher.get(ids)
                kl, n = topk_kl(vals, top, logits_fn(windows[ids], levels))
                total, tokens = total + kl, tokens + n
        return total / max(tokens, 1)

    return evaluate
