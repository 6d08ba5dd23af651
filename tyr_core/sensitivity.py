"""The sensitivity scan: every gene one level denser and one level sparser than the parent, all else unchanged, scored
on a few fixed validation windows, and what the search makes of it: the first parent of an iteration (the moves the
scan says pay, paired under the budget) and the weights of the mutation's gene draws.

The sparsity landscape is a few steep genes and many flat ones; a uniform mutation spends most of its offspring on
the flat ones, so the scan measures each gene's slope once per iteration, at a fraction of the search's cost.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from .budget import ParamBudget, fit_budget
from .grid import Sublayer
from .keys import KINDS
from .search import Evaluate, SearchConfig, SearchGuide, require_fits, stage_window_count


class SensitivityScan(BaseModel):
    """Fitness change of every one-level move from the parent: the scan's artefact, JSON round-trips exactly."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    iteration: int
    parent: list[int] = Field(description="the levels every move starts from")
    windows: list[int] = Field(description="validation window ids every candidate was scored on")
    parent_fitness: float
    denser: list[float | None] = Field(
        description="per gene: fitness one level denser minus the parent's (None: no level)"
    )
    sparser: list[float | None] = Field(description="per gene: fitness one level sparser minus the parent's")
    evaluations: int = Field(description="candidates scored, the parent included")
    tokens: int = Field(description="tokens scored over all candidates")


def scan_window_ids(tokens: int, n_windows: int, seq_len: int) -> list[int]:
    """Windows holding at least ``tokens`` tokens, spread evenly over the validation windows (no RNG: the search's
    stream stays the reference's)."""
    count = stage_window_count(tokens, n_windows, seq_len)
    return [j * n_windows // count for j in range(count)]


def run_scan(
    parent: Sequence[int],
    genes: Sequence[Sublayer],
    evaluate: Evaluate,
    windows: list[int],
    iteration: int,
    seq_len: int,
) -> SensitivityScan:
    """Score the parent and each of its one-level neighbours on ``windows`` (batch-major when the evaluator pools).

    Raises:
        SearchError: if ``parent`` does not fit the genome.
    """
    require_fits(parent, genes, "scan parent")
    pool, moves = [list(parent)], []
    for j, gene in enumerate(genes):
        for delta in (-1, 1):
            if gene.lo <= parent[j] + delta <= gene.hi:
                child = list(parent)
                child[j] += delta
                pool.append(child)
                moves.append((j, delta))
    pooled = getattr(evaluate, "pool", None)
    scores = pooled(pool, windows) if pooled is not None else [evaluate(c, windows) for c in pool]
    base = float(scores[0])
    denser: list[float | None] = [None] * len(genes)
    sparser: list[float | None] = [None] * len(genes)
    for (j, delta), score in zip(moves, scores[1:], strict=True):
        (denser if delta < 0 else sparser)[j] = float(score) - base
    return SensitivityScan(
        iteration=iteration,
        parent=list(parent),
        windows=list(windows),
        parent_fitness=base,
        denser=denser,
        sparser=sparser,
        evaluations=len(pool),
        tokens=len(pool) * len(windows) * seq_len,
    )


def sensitivities(scan: SensitivityScan) -> list[float]:
    """Each gene's slope: the larger of its two moves' fitness changes, in size."""
    return [max(abs(d or 0.0), abs(s or 0.0)) for d, s in zip(scan.denser, scan.sparser, strict=True)]


def mutation_weights(scan: SensitivityScan, floor: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Weights of the genes a shift draws to go denser (in proportion to sensitivity) and sparser (in inverse
    proportion), each floored at ``floor`` times the mean sensitivity so that no gene is frozen out."""
    sens = sensitivities(scan)
    eps = floor * statistics.fmean(sens) if any(sens) else 1.0
    return tuple(s + eps for s in sens), tuple(1.0 / (s + eps) for s in sens)


def default_orders(genes: Sequence[Sublayer]) -> tuple[list[int], list[int]]:
    """Which genes a budget repair moves first without a scan: sparser from the last layers, denser from the first
    (the first layers are the most sensitive), MLP before attention (its levels are finer in parameters)."""
    sparser = sorted(range(len(genes)), key=lambda j: (-genes[j].layer, genes[j].kind != "mlp"))
    denser = sorted(range(len(genes)), key=lambda j: (genes[j].layer, genes[j].kind != "mlp"))
    return sparser, denser


def _scan_orders(scan: SensitivityScan) -> tuple[list[int], list[int]]:
    n = len(scan.parent)
    cost = [s if s is not None else float("inf") for s in scan.sparser]
    gain = [-d if d is not None else float("-inf") for d in scan.denser]
    return sorted(range(n), key=lambda j: cost[j]), sorted(range(n), key=lambda j: -gain[j])


def scan_allocation(
    scan: SensitivityScan, genes: Sequence[Sublayer], budget: ParamBudget | None = None, exchange: bool = False
) -> list[int]:
    """The first-order allocation the scan implies: the genes whose densening gains most paired with the genes whose
    sparsening costs least, one level each, while a pair's gain exceeds its cost.

    Without ``exchange`` a pair stays in one kind (equal steps: the group budgets hold); with it, a densening is paid
    by the sparsenings cheapest per parameter freed, of either kind, until the parameters balance. With a
    ``budget`` the result is then moved into its band (``fit_budget``)."""
    levels = list(scan.parent)
    gain = {j: -d for j, d in enumerate(scan.denser) if d is not None and d < 0}
    cost = {j: s for j, s in enumerate(scan.sparser) if s is not None}
    used: set[int] = set()
    if not exchange:
        for kind in KINDS:
            spar = sorted((j for j in cost if genes[j].kind == kind), key=lambda j: cost[j])
            for d in sorted((j for j in gain if genes[j].kind == kind), key=lambda j: -gain[j]):
                if d in used:
                    continue
                i = next((i for i in spar if i not in used and i != d), None)
                if i is None or gain[d] <= cost[i]:
                    break
                levels[d], levels[i] = levels[d] - 1, levels[i] + 1
                used |= {d, i}
    else:
        if budget is None:
            raise ValueError("an exchange between kinds needs the parameter budget")
        added = {j: budget.kept[j][levels[j] - 1] - budget.kept[j][levels[j]] for j in gain}
        freed = {j: budget.kept[j][levels[j]] - budget.kept[j][levels[j] + 1] for j in cost}
        spar = sorted((j for j in cost if freed[j] > 0), key=lambda j: cost[j] / freed[j])
        balance = 0  # parameters freed minus parameters added so far
        for d in sorted((j for j in gain if added[j] > 0), key=lambda j: -gain[j] / added[j]):
            if d in used:
                continue
            bundle, paid, need = [], 0.0, added[d] - balance
            for i in spar:
                if need <= 0:
                    break
                if i not in used and i != d:
                    bundle.append(i)
                    paid += cost[i]
                    need -= freed[i]
            if need > 0 or gain[d] <= paid:
                break
            levels[d] -= 1
            for i in bundle:
                levels[i] += 1
            used |= {d, *bundle}
            balance = -need
    if budget is not None:
        levels = fit_budget(levels, genes, budget, *_scan_orders(scan))
    return levels


def start_levels(
    cfg: SearchConfig,
    genes: Sequence[Sublayer],
    scan: SensitivityScan | None,
    budget: ParamBudget | None,
    parent: Sequence[int] | None = None,
) -> list[int]:
    """An iteration's first parent: the centres (``parent`` or all zeros), or the scan's allocation
    (``search.start=scan``); moved into the parameter budget's band when there is one."""
    levels = list(parent) if parent is not None else [0] * len(genes)
    if cfg.start == "scan":
        if scan is None:
            raise ValueError("search.start=scan needs the sensitivity scan")
        return scan_allocation(scan, genes, budget, cfg.exchange == "params")
    if budget is not None:
        levels = fit_budget(levels, genes, budget, *default_orders(genes))
    return levels


def make_guide(
    cfg: SearchConfig, genes: Sequence[Sublayer], scan: SensitivityScan | None, budget: ParamBudget | None
) -> SearchGuide | None:
    """The search's guide for these settings (None: the reference's walk). The budget's band is widened to hold the
    first parent where the grid is too coarse to reach it, so the parent is always a legal candidate."""
    if budget is None and cfg.mutation == "uniform" and cfg.exchange == "none":
        return None
    if budget is not None:
        budget = budget.widened_to(start_levels(cfg, genes, scan, budget))
    denser = sparser = None
    if cfg.mutation == "sensitivity":
        if scan is None:
            raise ValueError("search.mutation=sensitivity needs the sensitivity scan")
        denser, sparser = mutation_weights(scan, cfg.sensitivity_floor)
    return SearchGuide(budget=budget, denser=denser, sparser=sparser, exchange=cfg.exchange == "params")
