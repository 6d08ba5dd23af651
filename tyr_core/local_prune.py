"""The local pruner: Taylor-informed group saliency, OBS updates and an exact least-squares refit.

Follows docs/algorithm.md (the released code's ``LocalPruner``): work on ``B = W^T`` (rows are input channels),
fp32 ``H = sum x x^T`` damped by 1% of its mean diagonal, a fixed ``G = H B`` from the dense weight, groups removed
greedily over a few rounds with OBS updates, then the kept rows refitted exactly: ``B_K = H_KK^-1 G_K``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sublayer_layout import PrunedSublayer, kept_columns

_ZERO = 1e-12
_PRUNED_SCORE = 1e20


def damp(hessian: torch.Tensor, fraction: float) -> torch.Tensor:
    """``H + fraction * mean(diag H) * I`` in fp32; dead inputs (zero diagonal) get the same damping."""
    h = hessian.float().clone()
    mean_diag = torch.diagonal(h).mean()
    if mean_diag <= 0:
        mean_diag = torch.tensor(1.0, device=h.device)
    h.diagonal().add_(fraction * mean_diag)
    return h


def _group_rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    return kept_columns(groups, group_size)


def _split_rounds(to_remove: int, rounds: int) -> list[int]:
    """Near-equal removal counts per round; the first ``extra`` rounds take one more (as the reference)."""
    rounds = max(min(rounds, to_remove), 1)
    base, extra = divmod(to_remove, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


def _scores(
    w: torch.Tensor,
    hinv: torch.Tensor,
    g: torch.Tensor,
    group_size: int,
    pruned: torch.Tensor,
    first_order: float = 1.0,
) -> torch.Tensor:
    """Saliency of every group: OBS removal cost + ``first_order`` x the signed first-order term ``<W_g, G_g>``.

    The OBS cost ``w_g^T [H^-1]_gg^-1 w_g / 2`` is the output error left after the other groups compensate for the
    removed one. At the dense start ``<W_g, (H W)_g>`` is the share of the output's energy that the group carries,
    so with weight 1 (the reference) selection follows output energy; with 0 it is pure OBS (docs/algorithm.md).
    """
    n_groups = w.shape[0] // group_size
    first = (w * g).reshape(n_groups, group_size, -1).sum(dim=(1, 2))
    if group_size == 1:
        diag = torch.diagonal(hinv).clamp_min(_ZERO)
        second = (w * w).sum(dim=1) / (2 * diag)
    else:
        idx = torch.arange(n_groups * group_size, device=w.device).reshape(n_groups, group_size)
        blocks = hinv[idx[:, :, None], idx[:, None, :]]  # (n_groups, gs, gs) diagonal blocks
        blocks[pruned] = torch.eye(group_size, device=w.device)  # pruned blocks are zero; their score is overwritten
        wg = w.reshape(n_groups, group_size, -1)
        solved = torch.linalg.solve(blocks, wg)
        second = 0.5 * (wg * solved).sum(dim=(1, 2))
    score = second + first_order * first if first_order else second
    score[pruned] = _PRUNED_SCORE
    return score


def _obs_remove(w: torch.Tensor, hinv: torch.Tensor, rows: torch.Tensor) -> None:
    """Remove input rows ``rows`` with the joint OBS update of the remaining rows, in place."""
    hinv_pp = hinv[rows][:, rows]
    coupling = hinv[:, rows] @ torch.linalg.inv(hinv_pp)  # (d_in, |P|)
    w.sub_(coupling @ w[rows])
    hinv.sub_(coupling @ hinv[rows])
    w[rows] = 0
    hinv[rows] = 0
    hinv[:, rows] = 0


def refit(h: torch.Tensor, g: torch.Tensor, kept_rows: torch.Tensor) -> torch.Tensor:
    """Exact least-squares weights of the kept input rows: ``H_KK^-1 G_K`` (shape ``(|K|, d_out)``)."""
    h_kk = h[kept_rows][:, kept_rows].double()
    return torch.linalg.solve(h_kk, g[kept_rows].double()).float()


@dataclass(frozen=True)
class LocalProblem:
    """What every copy of one sublayer shares: computed once, then pruned at each level."""

    weight: torch.Tensor  # dense (d_out, d_in), original dtype
    b: torch.Tensor  # W^T in fp32 with dead input rows zeroed
    h: torch.Tensor  # damped H
    g: torch.Tensor  # H B, fixed from the dense weight
    hinv: torch.Tensor  # inv(H)


def prepare(
    weight: torch.Tensor, hessian: torch.Tensor, damping: float = 0.01, cross: torch.Tensor | None = None
) -> LocalProblem:
    """Damp ``H``, zero dead inputs, and compute ``G`` and ``H^-1`` once per sublayer.

    ``G = H B`` fits the dense weight's outputs on the inputs ``H`` was collected from. With ``cross =
    sum x_pruned x_dense^T`` it is ``(cross + damping) B`` instead: the copy then fits the *dense model's* outputs
    from the pruned model's inputs, correcting upstream error rather than reproducing it (docs/algorithm.md).
    """
    b = weight.detach().float().t().contiguous()
    b[torch.diagonal(hessian) == 0] = 0
    h = damp(hessian, damping)
    if cross is None:
        g = h @ b
    else:
        g = (cross.float() + (h - hessian.float())) @ b
        # the selection's OBS chain must start from the optimum of the same objective the refit solves
        b = torch.linalg.solve(h.double(), g.double()).float()
    return LocalProblem(weight, b, h, g, torch.linalg.inv(h.double()).float())


def select_groups(
    problem: LocalProblem, group_size: int, keep: int, rounds: int, first_order: float = 1.0
) -> torch.Tensor:
    """Greedy group removal with OBS updates; returns the sorted indices of the ``keep`` surviving groups."""
    b, g = problem.b, problem.g
    n_groups = b.shape[0] // group_size
    w, hinv = b.clone(), problem.hinv.clone()
    pruned = w.reshape(n_groups, -1).abs().sum(dim=1) <= _ZERO
    if pruned.any():
        rows = _group_rows(pruned.nonzero().flatten(), group_size)
        hinv[rows] = 0
        hinv[:, rows] = 0
        w = hinv @ g
    to_remove = n_groups - keep - int(pruned.sum())
    if to_remove > 0:
        for count in _split_rounds(to_remove, rounds):
            chosen = torch.topk(_scores(w, hinv, g, group_size, pruned, first_order), count, largest=False).indices
            _obs_remove(w, hinv, _group_rows(chosen, group_size))
            pruned[chosen] = True
    return (~pruned).nonzero().flatten()[:keep]


def prune_prepared(
    problem: LocalProblem,
    group_size: int,
    keep: int,
    rounds: int,
    refit_weights: bool = True,
    first_order: float = 1.0,
) -> PrunedSublayer:
    """Prune a prepared sublayer down to ``keep`` input groups (see ``prune_linear``)."""
    weight, b = problem.weight, problem.b
    d_out, d_in = weight.shape
    n_groups = d_in // group_size
    if not 0 <= keep <= n_groups:
        raise ValueError(f"keep={keep} groups is outside [0, {n_groups}]")
    if keep == n_groups:  # sparsity 0: the dense weight (dead inputs zeroed)
        return PrunedSublayer(torch.arange(n_groups, device=b.device), b.t().to(weight.dtype).contiguous())
    if keep == 0:  # sparsity 1: the sublayer is removed
        return PrunedSublayer(torch.zeros(0, dtype=torch.long, device=b.device), weight.new_zeros(d_out, 0))
    kept = select_groups(problem, group_size, keep, rounds, first_order)
    rows = _group_rows(kept, group_size)
    kept_b = refit(problem.h, problem.g, rows) if refit_weights else b[rows]
    return PrunedSublayer(kept, kept_b.t().to(weight.dtype).contiguous())


def prune_linear(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    keep: int,
    rounds: int,
    damping: float = 0.01,
    refit_weights: bool = True,
    first_order: float = 1.0,
) -> PrunedSublayer:
    """Prune the input groups of one linear layer (``o_proj`` or ``down_proj``) down to ``keep`` groups.

    Args:
        weight: dense weight ``(d_out, d_in)``.
        hessian: ``sum x x^T`` over calibration inputs ``(d_in, d_in)``, undamped.
        group_size: input columns per group (``head_dim`` for attention, 1 for the MLP).
        keep: groups to keep, ``0 <= keep <= d_in / group_size``.
        rounds: removal rounds (1 for attention, 16 for the MLP by default).
        damping: fraction of the mean Hessian diagonal added to its diagonal.
        refit_weights: if False, keep the dense values of the surviving columns (for ablations and tests).
        first_order: weight of the signed first-order term in the saliency (1: the reference, 0: pure OBS).

    Returns:
        The kept group indices and the refitted weight on the kept columns, ``(d_out, keep * group_size)``,
        in ``weight``'s dtype.
    """
    return prune_prepared(prepare(weight, hessian, damping), group_size, keep, rounds, refit_weights, first_order)


def magnitude_prune(weight: torch.Tensor, group_size: int, keep: int) -> PrunedSublayer:
    """Baseline: keep the groups whose output-projection columns have the largest L2 norm; no refit."""
    n_groups = weight.shape[1] // group_size
    norms = weight.detach().float().reshape(weight.shape[0], n_groups, group_size).pow(2).sum(dim=(0, 2))
    kept = torch.sort(torch.topk(norms, keep).indices).values
    return PrunedSublayer(kept, weight.detach()[:, kept_columns(kept, group_size)].contiguous())


def layer_error(weight: torch.Tensor, hessian: torch.Tensor, pruned: torch.Tensor) -> float:
    """``||X W^T - X Ŵ^T||^2 = tr((W - Ŵ) H (W - Ŵ)^T)`` for full-size weights ``(d_out, d_in)``."""
    diff = weight.double() - pruned.double()
    return float(torch.einsum("oi,ij,oj->", diff, hessian.double(), diff))
