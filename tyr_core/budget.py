"""One parameter budget: the fraction of decoder parameters a candidate physically removes, counted as the compact
export removes them (a KV head goes only with every query head of its group), and the plan's centres that aim at it.

The search keeps a candidate inside a band of ``tolerance`` around the target (``prune.budget=params``); with
``search.exchange=params`` a mutation may trade attention heads for MLP neurons inside that band.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .errors import GridError
from .families import Geometry
from .grid import Sublayer, kind_centres
from .keys import KINDS, Kind
from .param_count import attention_params, copy_params, decoder_params, mlp_params


@dataclass(frozen=True)
class ParamBudget:
    """Parameters each gene physically keeps at each level of its grid, and the band the search keeps the total in."""

    kept: tuple[dict[int, int], ...]  # per gene, in the genome's order: level -> parameters kept
    dense: int  # parameters of the dense decoder layers, norms included
    target: float  # fraction of ``dense`` to remove
    tolerance: float  # largest |removed fraction - target| a candidate may have

    def removed_fraction(self, levels: Sequence[int]) -> float:
        kept = sum(table[level] for table, level in zip(self.kept, levels, strict=True))
        return (self.dense - kept) / self.dense

    def error(self, levels: Sequence[int]) -> float:
        """Removed fraction minus the target: negative when the candidate keeps too much."""
        return self.removed_fraction(levels) - self.target

    def within(self, levels: Sequence[int]) -> bool:
        return abs(self.error(levels)) <= self.tolerance + 1e-12

    def widened_to(self, levels: Sequence[int]) -> ParamBudget:
        """This budget with its band wide enough to hold ``levels`` (a grid too coarse to reach the band)."""
        return replace(self, tolerance=max(self.tolerance, abs(self.error(levels))))


def budget_from_index(
    geo: Geometry, index: dict, genes: Sequence[Sublayer], target: float, tolerance: float
) -> ParamBudget:
    """The budget of a supernet from its index: each copy's entry holds what it keeps (``params``,
    ``groups_kept``), so no copy is read."""
    position = {(g.layer, g.kind): j for j, g in enumerate(genes)}
    kept: list[dict[int, int]] = [{} for _ in genes]
    for entry in index["copies"]:
        j = position.get((entry["layer"], entry["kind"]))
        if j is not None:
            kept[j][entry["level"]] = copy_params(geo, entry["kind"], entry["params"], entry["groups_kept"])
    for gene, table in zip(genes, kept, strict=True):
        missing = [lv for lv in gene.levels if lv not in table]
        if missing:
            raise GridError(f"{gene.name}: the supernet index has no copy at levels {missing}")
    return ParamBudget(tuple(kept), decoder_params(geo), target, tolerance)


def fit_budget(
    levels: Sequence[int],
    genes: Sequence[Sublayer],
    budget: ParamBudget,
    sparser_first: Sequence[int],
    denser_first: Sequence[int],
) -> list[int]:
    """``levels`` moved one level at a time until they are inside the budget's band, or as close as the grid allows.

    A candidate that keeps too much moves genes sparser in the order ``sparser_first``, one that keeps too little
    moves them denser in ``denser_first``; a moved gene goes to the back of its order, so the moves are spread."""
    levels = list(levels)
    orders = {1: list(sparser_first), -1: list(denser_first)}
    for _ in range(sum(g.hi - g.lo for g in genes) + 1):
        err = budget.error(levels)
        if abs(err) <= budget.tolerance:
            break
        step = 1 if err < 0 else -1
        order = orders[step]
        for pos, j in enumerate(order):
            trial = list(levels)
            trial[j] += step
            if genes[j].lo <= trial[j] <= genes[j].hi and abs(budget.error(trial)) < abs(err):
                levels = trial
                order.append(order.pop(pos))
                break
        else:
            break  # no single move brings it closer: the grid's resolution
    return levels


# --- the plan: centres whose estimated physical removal meets the target --------------------------------------------


def expected_attention_params(geo: Geometry, removed: int) -> float:
    """Parameters an attention keeps with ``removed`` query heads gone, averaged over which heads go: a KV head goes
    only when its whole group does, which the local pruner decides later (a hypergeometric estimate)."""
    kept = geo.heads - removed
    if kept <= 0:
        return float(attention_params(geo, torch.zeros(0, dtype=torch.long)))
    group = geo.heads_per_kv
    gone = math.comb(geo.heads - group, removed - group) / math.comb(geo.heads, removed) if removed >= group else 0.0
    kv = geo.kv_heads * (1.0 - gone) * geo.head_dim
    q = kept * geo.head_dim
    weights = geo.hidden * (2 * q + 2 * kv)
    biases = (q + 2 * kv if geo.qkv_bias else 0) + (geo.hidden if geo.o_bias else 0)
    norms = geo.hidden + (2 * geo.head_dim if geo.family == "qwen3" else 0)
    return weights + biases + norms


def estimated_removed_fraction(geo: Geometry, centres: dict[Kind, list[int]]) -> float:
    """The decoder fraction that centres are expected to remove (``expected_attention_params`` for the KV heads)."""
    kept = sum(expected_attention_params(geo, r) for r in centres["attn"])
    kept += sum(mlp_params(geo, geo.intermediate - r) for r in centres["mlp"])
    return 1.0 - kept / decoder_params(geo)


def params_centres(geo: Geometry, target: float, tolerance: float, units: dict[Kind, int]) -> dict[Kind, list[int]]:
    """Uniform centres whose estimated physical removal is ``target`` of the decoder's parameters.

    Both kinds lose the same fraction of their groups (the paper's uniform start) at the fraction where the
    estimate meets the target; the MLP, the finer kind, then absorbs the attention's rounding.

    Raises:
        GridError: if no centres come within ``tolerance`` of the target.
    """
    layers = geo.num_layers
    available = {kind: geo.groups(kind) * layers // units[kind] for kind in KINDS}

    def centres(attn_units: int, mlp_units: int) -> dict[Kind, list[int]]:
        return {
            "attn": kind_centres(geo.heads, layers, attn_units, units["attn"]),
            "mlp": kind_centres(geo.intermediate, layers, mlp_units, units["mlp"]),
        }

    def error(attn_units: int, mlp_units: int) -> float:
        return estimated_removed_fraction(geo, centres(attn_units, mlp_units)) - target

    lo, hi = 0.0, 1.0
    for _ in range(40):  # the estimate grows with the shared fraction: bisect it
        mid = (lo + hi) / 2
        if error(round(mid * available["attn"]), round(mid * available["mlp"])) < 0:
            lo = mid
        else:
            hi = mid
    attn_units = round(hi * available["attn"])
    first, last = 0, available["mlp"]
    while first < last:  # the fewest MLP units that reach the target, then the closer of it and one fewer
        mid = (first + last) // 2
        if error(attn_units, mid) < 0:
            first = mid + 1
        else:
            last = mid
    mlp_units = min(
        (m for m in (first - 1, first) if 0 <= m <= available["mlp"]), key=lambda m: abs(error(attn_units, m))
    )
    if abs(error(attn_units, mlp_units)) > tolerance:
        raise GridError(
            f"target_sparsity={target} of the decoder's parameters cannot be reached within {tolerance}: the nearest "
            f"uniform centres remove an estimated {error(attn_units, mlp_units) + target:.4f}"
        )
    return centres(attn_units, mlp_units)
