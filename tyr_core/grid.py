"""Integer bookkeeping of sparsity: groups per sublayer, centres, steps and the supernet level grid.

Everything is counted in whole groups (query heads for attention, neurons for the MLP), never in float
sparsities (docs/algorithm.md). A level ``l`` of a sublayer means ``centre + l * step`` groups removed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import GridError
from .keys import KINDS, Kind, sublayer_name


@dataclass(frozen=True)
class Sublayer:
    """One gene of the search: a layer's attention or MLP, with its grid in whole groups."""

    layer: int
    kind: Kind
    groups: int  # heads or neurons in the dense sublayer
    centre: int  # groups removed at level 0
    step: int  # groups per level (>= 1)
    lo: int  # lowest level (<= 0)
    hi: int  # highest level (>= 0)

    @property
    def name(self) -> str:
        return sublayer_name(self.layer, self.kind)

    @property
    def levels(self) -> range:
        return range(self.lo, self.hi + 1)

    def removed(self, level: int) -> int:
        if not self.lo <= level <= self.hi:
            raise GridError(f"{self.name}: level {level} is outside the supernet grid [{self.lo}, {self.hi}]")
        return self.centre + level * self.step

    def sparsity(self, level: int) -> float:
        return self.removed(level) / self.groups

    def density_weight(self, level: int) -> float:
        """Unnormalised weight of a copy in the paper's expectation (eq. 5): its density 1 - S_e."""
        return 1.0 - self.sparsity(level)


def interval_groups(groups: int, fraction: float, unit: int = 1) -> int:
    """Groups per level for an interval given as a fraction of the sublayer, floored at one group.

    With ``unit`` > 1 every width must stay a multiple of it (a serving format's tile, or a whole attention), so
    the step is rounded to a multiple of ``unit`` and floored at one unit."""
    if unit == 1:
        return max(1, round(groups * fraction))
    return max(unit, round(groups * fraction / unit) * unit)


def kind_centres(groups: int, num_layers: int, removed_units: int, unit: int = 1) -> list[int]:
    """Groups removed per layer when ``removed_units`` units of ``unit`` groups are spread over equal sublayers.

    With units larger than a group the remainder goes to the last layers: the first layers are the most
    sensitive, and a whole attention is too coarse to spread evenly."""
    if unit == 1:
        return distribute(removed_units, [groups] * num_layers)
    per_layer = distribute(removed_units, [groups // unit] * num_layers)
    return [units * unit for units in reversed(per_layer)]


def make_grid(groups: int, centre: int, step: int, num_levels: int) -> tuple[int, int]:
    """Level bounds ``(lo, hi)`` of a grid of ``num_levels`` around ``centre``, cut short at 0 and ``groups``."""
    half = num_levels // 2
    return -min(centre // step, half), min((groups - centre) // step, half)


def distribute(total_removed: int, groups: list[int]) -> list[int]:
    """Spread ``total_removed`` groups over sublayers as evenly as possible (the uniform centre).

    Each sublayer gets ``floor(share)``; the remainder goes one group at a time to the sublayers with the
    largest fractional parts (spread evenly over depth when all sublayers are equal), so the total is exact.
    """
    total, n = sum(groups), len(groups)
    shares = [total_removed * g / total for g in groups]
    base = [int(s) for s in shares]
    extra = total_removed - sum(base)
    if extra and len(set(groups)) == 1:  # equal sublayers: spread the extra groups evenly over depth
        for j in range(extra):
            base[j * n // extra] += 1
        return base
    order = sorted(range(n), key=lambda i: (-(shares[i] - base[i]), i))
    for i in order[:extra]:
        base[i] += 1
    return base


def uniform_centres(groups: list[int], target: float, kind: Kind, tolerance: float, unit: int = 1) -> list[int]:
    """Groups removed per sublayer so that the type's total is ``target`` of its groups, as evenly as possible, in
    whole ``unit``s of groups (``kind_centres``).

    Raises:
        GridError: if no whole number of units is within ``tolerance`` of ``target`` for this sublayer type.
    """
    if unit > 1:
        total_units = sum(groups) // unit
        removed_units = round(target * total_units)
        achieved = removed_units / total_units
        if abs(achieved - target) > tolerance:
            raise GridError(
                f"target_sparsity={target} cannot be expressed for {kind} in units of {unit} groups: the nearest "
                f"reachable sparsity is {achieved:.4f} (|error| > sparsity_tolerance={tolerance})"
            )
        return kind_centres(groups[0], len(groups), removed_units, unit)
    total = sum(groups)
    removed = round(target * total)
    achieved = removed / total
    if abs(achieved - target) > tolerance:
        raise GridError(
            f"target_sparsity={target} cannot be expressed for {kind}: the model has {total} {kind} groups in all, "
            f"so the nearest reachable sparsity is {achieved:.4f} (|error| > sparsity_tolerance={tolerance}). "
            "Choose a target that is a multiple of 1/groups or raise sparsity_tolerance."
        )
    return distribute(removed, groups)


def build_sublayers(
    groups: dict[Kind, int],
    num_layers: int,
    centres: dict[Kind, list[int]],
    interval: float,
    num_levels: int,
    units: dict[Kind, int] | None = None,
) -> list[Sublayer]:
    """All genes of one iteration, ordered by layer then kind (attention first).

    Args:
        groups: groups per sublayer of each kind (heads, neurons).
        num_layers: decoder layers.
        centres: groups removed at level 0, per kind and layer.
        interval: step as a fraction of the sublayer's groups (0.125 in iteration 1), floored at one group.
        num_levels: supernet copies per sublayer when not cut short (9 in the paper).
        units: groups every width of a kind is a multiple of (default 1); steps are multiples of it.
    """
    if num_levels < 1 or num_levels % 2 == 0:
        raise GridError(f"num_levels={num_levels} must be odd and >= 1 so the grid is centred")
    out = []
    for layer in range(num_layers):
        for kind in KINDS:
            n, c = groups[kind], centres[kind][layer]
            if not 0 <= c <= n:
                raise GridError(f"{sublayer_name(layer, kind)}: centre {c} groups is outside [0, {n}]")
            unit = (units or {}).get(kind, 1)
            if n % unit or c % unit:
                raise GridError(f"{sublayer_name(layer, kind)}: {n} groups, centre {c}: not multiples of {unit}")
            step = interval_groups(n, interval, unit)
            lo, hi = make_grid(n, c, step, num_levels)
            out.append(Sublayer(layer, kind, n, c, step, lo, hi))
    return out


def recentre(sublayers: list[Sublayer], levels: list[int]) -> dict[Kind, list[int]]:
    """Groups removed by the winning levels: the next iteration's centres (docs/algorithm.md)."""
    centres: dict[Kind, list[int]] = {k: [] for k in KINDS}
    for sub, level in zip(sublayers, levels, strict=True):
        centres[sub.kind].append(sub.removed(level))
    return centres


@dataclass(frozen=True)
class IterationPlan:
    """One iteration's genes, as its plan artefact holds them; ``to_json`` gives that artefact's JSON value."""

    iteration: int
    sublayers: tuple[Sublayer, ...]

    @classmethod
    def from_json(cls, plan: dict[str, Any]) -> IterationPlan:
        return cls(plan["iteration"], tuple(Sublayer(**s) for s in plan["sublayers"]))

    def to_json(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "sublayers": [asdict(s) for s in self.sublayers]}

    def layers(self) -> list[int]:
        """The decoder layers with a gene, in the order the supernet is built."""
        return sorted({s.layer for s in self.sublayers})

    def levels_of(self, layer: int) -> list[int]:
        """Every level some sublayer of ``layer`` has in its grid, lowest first."""
        return sorted({lv for s in self.sublayers if s.layer == layer for lv in s.levels})

    def kinds_at(self, layer: int, level: int) -> list[Kind]:
        """The sublayers of ``layer`` whose grid has ``level`` (grids are cut short at 0 and 100%), in plan order."""
        return [s.kind for s in self.sublayers if s.layer == layer and level in s.levels]
