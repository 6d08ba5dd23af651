"""The evolutionary sparsity-shift search of one iteration (docs/algorithm.md), pure and seeded.

A candidate is a list of integer levels, one per gene (``grid.Sublayer``, in the genome's order). A mutation moves
one level of budget from a gene to a gene of the same kind, by the kind tag and never by index parity, so
the attention and MLP budgets never change. Selection is multi-stage and elitist: every stage scores its pool
on a fresh minibatch of calibration windows and keeps the best, and the parent rejoins the pool at the last stage.
The evaluator is injected and the RNG is explicit and serialised with the state, so the search runs without
a model and a search resumed from any committed generation does exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import SearchError
from .grid import Sublayer
from .keys import Kind

if TYPE_CHECKING:  # the budget module imports torch; the CLI's read-only commands import this one
    from .budget import ParamBudget

log = logging.getLogger(__name__)

Evaluate = Callable[[list[int], list[int]], float]  # (candidate levels, window ids) -> fitness, lower is better
EvaluatePool = Callable[[list[list[int]], list[int]], list[float]]  # (candidates, window ids) -> their fitness
Progress = Callable[[int, int], None]  # (evaluations done, evaluations planned) within one generation

# Mutations tried per requested child before ``offspring`` settles for fewer: a small or nearly frozen search space
# cannot hold ``n`` unique children, and the reference would loop forever there.
ATTEMPTS_PER_CHILD = 50


class SearchConfig(BaseModel):
    """Settings of the sparsity-shift search (docs/algorithm.md); the defaults are the paper's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    offspring: int = Field(128, ge=1, description="unique children of the parent per generation")
    generations: int = Field(50, ge=0, description="generations per iteration")
    stage_tokens: list[int] = Field(
        default_factory=lambda: [2048, 16384, 131072],
        min_length=1,
        description="calibration tokens each selection stage scores its pool on, a fresh minibatch per stage",
    )
    survivors: list[int] = Field(
        default_factory=lambda: [16, 4, 1],
        min_length=1,
        description="candidates kept after each stage; the last stage keeps 1, the next parent",
    )
    min_stage_windows: int = Field(
        1, ge=1, description="fewest windows a selection stage scores, whatever its token count (1: the reference)"
    )
    max_swaps: int = Field(
        4, ge=1, description="most sparsity shifts per mutation; the count is the min of two uniform draws"
    )
    prefix_sharing: bool = Field(
        True, description="reuse the parent's hidden states for a candidate's unchanged leading layers (speed only)"
    )
    attention: Literal["heads", "whole"] = Field(
        "heads",
        description="heads: attention loses single query heads; whole: an attention keeps all its heads or none, "
        "which formats without per-layer head counts (Nemotron-NAS, vLLM) can express",
    )
    exchange: Literal["none", "params"] = Field(
        "none",
        description="none: attention and MLP budgets stay apart (the paper); params: a mutation may trade heads for "
        "neurons inside the parameter budget (needs prune.budget=params)",
    )
    start: Literal["uniform", "scan"] = Field(
        "uniform", description="each iteration's first parent: the centres (reference) or the scan's allocation"
    )
    mutation: Literal["uniform", "sensitivity"] = Field(
        "uniform",
        description="uniform: genes drawn uniformly (reference); sensitivity: in proportion to the scan's measured "
        "sensitivity (sparser moves in inverse proportion)",
    )
    scan_tokens: int = Field(
        512, ge=1, description="tokens the sensitivity scan scores each one-level move on (whole windows, at least one)"
    )
    sensitivity_floor: float = Field(
        0.1, gt=0.0, description="share of the mean sensitivity every gene's weight gets, so flat genes still move"
    )
    selection: Literal["mean", "paired"] = Field(
        "mean",
        description="mean: the last stage keeps the lowest mean (reference); paired: the best child replaces the "
        "parent only when their per-window differences put it ahead beyond paired_z standard errors",
    )
    paired_z: float = Field(1.0, ge=0.0, description="selection=paired: standard errors a child must win by")
    hidden_weight: float = Field(
        0.0,
        ge=0.0,
        description="weight of the hidden-state term of the paper's eq. 6 in the fitness (each token's relative "
        "squared error at hidden_layers, added to its KL); 0 scores the logits only (the reference)",
    )
    hidden_layers: list[int] | None = Field(
        None,
        description="decoder layers the hidden-state term compares (negative counts from the last); default the "
        "first, middle and last, as the paper's ablation",
    )

    @field_validator("stage_tokens")
    @classmethod
    def _tokens_positive_and_non_decreasing(cls, tokens: list[int]) -> list[int]:
        if any(t <= 0 for t in tokens):
            raise ValueError(f"stage_tokens={tokens}: every stage needs a positive number of tokens")
        if any(b < a for a, b in pairwise(tokens)):
            raise ValueError(f"stage_tokens={tokens} must be non-decreasing: later stages judge fewer candidates")
        return tokens

    @field_validator("survivors")
    @classmethod
    def _survivors_narrow_to_one(cls, survivors: list[int]) -> list[int]:
        if any(b > a for a, b in pairwise(survivors)):
            raise ValueError(
                f"survivors={survivors} must be non-increasing: a stage cannot keep more than it was given"
            )
        if survivors[-1] != 1:
            raise ValueError(f"survivors={survivors} must end with 1: the last stage picks the next parent")
        return survivors

    @model_validator(mode="after")
    def _stages_fit_together(self) -> SearchConfig:
        if len(self.stage_tokens) != len(self.survivors):
            raise ValueError(
                f"stage_tokens has {len(self.stage_tokens)} stages but survivors has {len(self.survivors)}: "
                "give one survivor count per stage"
            )
        if self.offspring < self.survivors[0]:
            raise ValueError(f"offspring={self.offspring} must be at least survivors[0]={self.survivors[0]}")
        return self

    def hidden_layer_ids(self, n_layers: int) -> list[int]:
        """The decoder layers the fitness's hidden-state term compares, for a model of ``n_layers``; empty when
        the term is off.

        Raises:
            SearchError: if a layer of ``hidden_layers`` is outside the model.
        """
        if self.hidden_weight == 0:
            return []
        wanted = self.hidden_layers if self.hidden_layers is not None else [0, n_layers // 2, n_layers - 1]
        if not wanted or any(not -n_layers <= j < n_layers for j in wanted):
            raise SearchError(
                f"search.hidden_layers={wanted} must name at least one decoder layer in [-{n_layers}, {n_layers - 1}]"
            )
        return sorted({j % n_layers for j in wanted})

    @property
    def needs_scan(self) -> bool:
        """Whether each iteration's search needs the sensitivity scan before its first generation."""
        return self.start == "scan" or self.mutation == "sensitivity"


# --- constraints (named predicates) ----------------------------------------------------------------------------------


def removed_groups(levels: Sequence[int], genes: Sequence[Sublayer]) -> dict[Kind, int]:
    """Groups removed per kind by a candidate: the budgets a mutation must preserve.

    Raises:
        GridError: if a level is outside its gene's grid.
    """
    totals: dict[Kind, int] = {}
    for gene, level in zip(genes, levels, strict=True):
        totals[gene.kind] = totals.get(gene.kind, 0) + gene.removed(level)
    return totals


def check_budget(candidate: Sequence[int], reference: Sequence[int], genes: Sequence[Sublayer]) -> bool:
    """Whether ``candidate`` removes exactly as many groups of every kind as ``reference`` (the parent)."""
    return removed_groups(candidate, genes) == removed_groups(reference, genes)


def check_bounds(levels: Sequence[int], genes: Sequence[Sublayer]) -> bool:
    """Whether the candidate has one level per gene, each inside that gene's grid ``[lo, hi]``."""
    return len(levels) == len(genes) and all(g.lo <= lv <= g.hi for g, lv in zip(genes, levels, strict=True))


def require_fits(levels: Sequence[int], genes: Sequence[Sublayer], what: str = "candidate") -> None:
    """Fail fast, naming the sublayer, when ``levels`` does not fit the genome (e.g. a state from another plan).

    Raises:
        SearchError: on a length mismatch or a level outside its gene's grid.
    """
    if len(levels) != len(genes):
        raise SearchError(f"{what} has {len(levels)} levels but the genome has {len(genes)} sublayers")
    for gene, level in zip(genes, levels, strict=True):
        if not gene.lo <= level <= gene.hi:
            raise SearchError(f"{what}: {gene.name} is at level {level}, outside its grid [{gene.lo}, {gene.hi}]")


def can_go_denser(gene: Sublayer, level: int) -> bool:
    """Whether the gene has a copy one level denser (the supernet grid is cut short at the edges)."""
    return level - 1 >= gene.lo


def can_go_sparser(gene: Sublayer, level: int) -> bool:
    """Whether the gene has a copy one level sparser."""
    return level + 1 <= gene.hi


# --- mutation -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchGuide:
    """What steers a search away from the reference's uniform walk inside group budgets (None: the reference).

    ``budget`` keeps every child inside a band of physically removed parameters; ``denser`` and ``sparser`` weigh
    the genes a shift draws to go denser and sparser (the sensitivity scan's measure); ``exchange`` lets a shift
    move budget between attention and MLP, which only a parameter budget keeps in bounds."""

    budget: ParamBudget | None = None
    denser: tuple[float, ...] | None = None
    sparser: tuple[float, ...] | None = None
    exchange: bool = False

    @property
    def steers_shifts(self) -> bool:
        return self.denser is not None or self.exchange


def _draw(rng: np.random.Generator, genes: list[int], weights: Sequence[float] | None) -> int:
    """One of ``genes``: uniform as the reference draws, or in proportion to ``weights`` (one per gene of the
    genome)."""
    if weights is None:
        return genes[int(rng.integers(len(genes)))]
    w = np.array([weights[j] for j in genes], dtype=float)
    return genes[int(rng.choice(len(genes), p=w / w.sum()))]


def _guided_shift(
    child: list[int], genes: Sequence[Sublayer], rng: np.random.Generator, guide: SearchGuide
) -> tuple[int, int] | None:
    """``shift_one_level`` with weighted draws and, with ``guide.exchange``, a sparser gene of either kind."""
    sparser = [j for j, gene in enumerate(genes) if can_go_sparser(gene, child[j])]
    kinds = {genes[j].kind for j in sparser}
    denser = [
        j for j, gene in enumerate(genes) if can_go_denser(gene, child[j]) and (guide.exchange or gene.kind in kinds)
    ]
    if not denser or not sparser:
        return None
    d = _draw(rng, denser, guide.denser)
    same = sparser if guide.exchange else [j for j in sparser if genes[j].kind == genes[d].kind]
    i = _draw(rng, same, guide.sparser)
    child[d] -= 1
    child[i] += 1
    return d, i


def draw_swap_count(rng: np.random.Generator, max_swaps: int = 4) -> int:
    """Number of sparsity shifts of one mutation: the min of two uniform draws in ``1..max_swaps``.

    This favours small moves: P(n) = (2 (max_swaps - n) + 1) / max_swaps², i.e. 7, 5, 3, 1 / 16 for 4.
    """
    return min(int(rng.integers(1, max_swaps + 1)), int(rng.integers(1, max_swaps + 1)))


def shift_one_level(
    child: list[int], genes: Sequence[Sublayer], rng: np.random.Generator, guide: SearchGuide | None = None
) -> tuple[int, int] | None:
    """One sparsity shift, in place: gene ``d`` one level denser, gene ``i`` of the same kind one level sparser.

    As in the reference, ``d`` is uniform over the genes that can go denser and ``i`` uniform over the genes of
    ``d``'s kind that can go sparser, both judged before the shift; ``d == i`` is allowed and changes nothing.
    A gene is never moved off its grid. Kinds with no legal pair are skipped, where the reference
    would spin forever.

    A ``guide`` that steers shifts draws ``d`` and ``i`` by its weights, and with ``exchange`` from either kind.

    Returns:
        ``(d, i)``, or None when no kind has a legal move.
    """
    if guide is not None and guide.steers_shifts:
        return _guided_shift(child, genes, rng, guide)
    sparser: dict[Kind, list[int]] = {}
    for j, gene in enumerate(genes):
        if can_go_sparser(gene, child[j]):
            sparser.setdefault(gene.kind, []).append(j)
    denser = [j for j, gene in enumerate(genes) if gene.kind in sparser and can_go_denser(gene, child[j])]
    if not denser:
        return None
    d = denser[int(rng.integers(len(denser)))]
    same_kind = sparser[genes[d].kind]  # explicit kind tag: the budget of a kind moves only within that kind
    i = same_kind[int(rng.integers(len(same_kind)))]
    child[d] -= 1
    child[i] += 1
    return d, i


def mutate(
    parent: Sequence[int],
    genes: Sequence[Sublayer],
    rng: np.random.Generator,
    max_swaps: int = 4,
    guide: SearchGuide | None = None,
) -> list[int]:
    """A child of ``parent`` after ``draw_swap_count`` sparsity shifts (docs/algorithm.md).

    Every gene of a kind has the same step in groups, so each shift keeps the groups removed per kind exactly.

    Args:
        parent: levels, one per gene.
        genes: the genome, in the order of ``parent``.
        rng: the search's generator; the only source of randomness.
        max_swaps: most shifts per mutation.
        guide: how shifts are drawn (None: the reference).

    Raises:
        SearchError: if ``parent`` does not fit the genome.
    """
    require_fits(parent, genes, "parent")
    child = list(parent)
    for _ in range(draw_swap_count(rng, max_swaps)):
        shift_one_level(child, genes, rng, guide)
    return child


def offspring(
    parent: Sequence[int],
    genes: Sequence[Sublayer],
    rng: np.random.Generator,
    n: int,
    max_swaps: int = 4,
    guide: SearchGuide | None = None,
) -> list[list[int]]:
    """Up to ``n`` unique children of ``parent``, in the order drawn; a child equal to the parent is kept.

    Duplicates are rejected, and so is a child outside the guide's parameter budget. After
    ``ATTEMPTS_PER_CHILD * n`` mutations the search space is taken to be too small and fewer children are returned.
    """
    budget = guide.budget if guide is not None else None
    seen: set[tuple[int, ...]] = set()
    children: list[list[int]] = []
    for _ in range(ATTEMPTS_PER_CHILD * n):
        if len(children) == n:
            break
        child = mutate(parent, genes, rng, max_swaps, guide)
        if tuple(child) not in seen:
            seen.add(tuple(child))
            if budget is None or budget.within(child):
                children.append(child)
    if len(children) < n:
        log.info(
            "only %d unique offspring of %d requested: the search space around the parent is small", len(children), n
        )
    return children


# --- selection ------------------------------------------------------------------------------------------------------


def stage_window_count(tokens: int, n_windows: int, seq_len: int, min_windows: int = 1) -> int:
    """Fixed-length windows holding at least ``tokens`` tokens (and at least ``min_windows``), capped at the windows
    available. One window of text ranks candidates on one passage; more spread the judgement over the corpus."""
    return min(n_windows, max(1, min_windows, math.ceil(tokens / seq_len)))


def draw_stage_windows(
    rng: np.random.Generator, tokens: int, n_windows: int, seq_len: int, min_windows: int = 1
) -> list[int]:
    """A fresh minibatch of distinct calibration window ids (sorted) for one selection stage.

    Raises:
        SearchError: if there are no windows or they are empty.
    """
    if n_windows < 1 or seq_len < 1:
        raise SearchError(f"the search needs calibration windows: got n_windows={n_windows}, seq_len={seq_len}")
    count = stage_window_count(tokens, n_windows, seq_len, min_windows)
    return sorted(int(w) for w in rng.choice(n_windows, size=count, replace=False))


def planned_evaluations(n_candidates: int, survivors: Sequence[int]) -> int:
    """Most evaluations one generation can make: every stage's pool, with the parent's slot at the last stage."""
    total, size = 0, n_candidates
    for stage, keep in enumerate(survivors):
        if stage == len(survivors) - 1:
            size += 1  # the parent, unless it already survived
        total += size
        size = min(size, keep)
    return total


def _rank(score: float) -> float:
    """Sort key of a fitness: a NaN (a diverged candidate) ranks last instead of poisoning the sort."""
    return math.inf if math.isnan(score) else score


def paired_choice(scores: Sequence[Sequence[float]], parent: int, z: float) -> int:
    """The candidate that leads: the best child by mean when its per-window differences against the parent put it
    ahead by more than ``z`` standard errors of their mean, else the parent (index ``parent`` in ``scores``).

    The windows are the same for every candidate, so the paired differences cancel what makes a window hard for
    all of them, which is most of a window's spread."""
    means = [_rank(sum(row) / len(row)) for row in scores]
    children = [j for j in range(len(scores)) if j != parent]
    if not children:
        return parent
    best = min(children, key=lambda j: means[j])
    diffs = [c - p for c, p in zip(scores[best], scores[parent], strict=True)]
    mean = sum(diffs) / len(diffs)
    if math.isnan(mean) or math.isinf(means[best]):
        return parent
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return best if mean + z * se < 0 else parent


def keep_best(pool: list[list[int]], scores: list[float], keep: int) -> tuple[list[list[int]], list[float]]:
    """The ``keep`` lowest-scoring candidates with their scores; ties keep the pool's order (stable sort)."""
    order = sorted(range(len(pool)), key=lambda j: _rank(scores[j]))[:keep]
    return [pool[j] for j in order], [scores[j] for j in order]


@dataclass
class _Counter:
    """Evaluations made so far in a generation, reported through the optional progress callback."""

    total: int
    progress: Progress | None
    done: int = 0

    def score(self, evaluate: Evaluate, candidate: list[int], windows: list[int]) -> float:
        fitness = float(evaluate(list(candidate), list(windows)))  # copies: the evaluator cannot alter the pool
        self._count(1)
        return fitness

    def score_pool(self, evaluate: Evaluate, pool: list[list[int]], windows: list[int]) -> list[float]:
        """The whole pool on one batch of windows; batch-major when the evaluator has a ``pool`` method."""
        pooled: EvaluatePool | None = getattr(evaluate, "pool", None)
        if pooled is None:
            return [self.score(evaluate, c, windows) for c in pool]
        scores = [float(f) for f in pooled([list(c) for c in pool], list(windows))]
        self._count(len(pool))
        return scores

    def score_windows(self, evaluate: Evaluate, pool: list[list[int]], windows: list[int]) -> list[list[float]]:
        """The pool's fitness on each window apart; one window at a time when the evaluator has no
        ``pool_windows`` method."""
        per_window = getattr(evaluate, "pool_windows", None)
        if per_window is not None:
            scores = [[float(f) for f in row] for row in per_window([list(c) for c in pool], list(windows))]
        else:
            scores = [[float(evaluate(list(c), [w])) for w in windows] for c in pool]
        self._count(len(pool))
        return scores

    def _count(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


@dataclass(frozen=True)
class Selection:
    """Outcome of one generation's selection."""

    best: list[int]
    fitness: float  # on the last stage's minibatch
    evaluations: int


def select(
    candidates: Sequence[Sequence[int]],
    parent: Sequence[int],
    evaluate: Evaluate,
    cfg: SearchConfig,
    rng: np.random.Generator,
    n_windows: int,
    seq_len: int,
    progress: Progress | None = None,
) -> Selection:
    """Multi-stage elitist selection (docs/algorithm.md).

    Each stage draws a fresh minibatch of distinct windows, scores its whole pool on it and keeps the best
    ``cfg.survivors[stage]``. At the last stage the parent joins the pool if it is not already there, so a
    deterministic fitness never loses the parent; with minibatch noise the parent is re-scored and can be replaced.
    With ``cfg.selection == "paired"`` the last stage scores every window apart and the parent keeps its place
    unless a child beats it beyond the noise (``paired_choice``).

    Args:
        candidates: the offspring (unique).
        parent: the current parent.
        evaluate: ``(levels, window ids) -> fitness``, lower is better.
        cfg: stage sizes.
        rng: the search's generator (draws the minibatches).
        n_windows: calibration windows available (ids ``0..n_windows-1``).
        seq_len: tokens per window.
        progress: called with ``(done, total)`` after every evaluation; ``total`` counts the parent's slot at the
            last stage and drops by one when the parent is already a survivor.
    """
    pool = [list(c) for c in candidates]
    counter = _Counter(planned_evaluations(len(pool), cfg.survivors), progress)
    scores: list[float] = []
    last = len(cfg.survivors) - 1
    for stage, (tokens, keep) in enumerate(zip(cfg.stage_tokens, cfg.survivors, strict=True)):
        if stage == last:
            if list(parent) in pool:
                counter.total -= 1
            else:
                pool.append(list(parent))  # elitism
        windows = draw_stage_windows(rng, tokens, n_windows, seq_len, cfg.min_stage_windows)  # one batch per stage
        if stage == last and cfg.selection == "paired":
            per_window = counter.score_windows(evaluate, pool, windows)
            chosen = paired_choice(per_window, pool.index(list(parent)), cfg.paired_z)
            fitness = sum(per_window[chosen]) / len(windows)
            return Selection(best=pool[chosen], fitness=fitness, evaluations=counter.done)
        scores = counter.score_pool(evaluate, pool, windows)
        pool, scores = keep_best(pool, scores, keep)
    return Selection(best=pool[0], fitness=scores[0], evaluations=counter.done)


# --- state, generations, resume -------------------------------------------------------------------------------------


class GenerationRecord(BaseModel):
    """What one generation did, for reports and plots."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    generation: int = Field(description="1-based number of the generation")
    fitness: float = Field(description="the new parent's fitness on the last stage's minibatch")
    candidates: int = Field(description="unique offspring scored in the first stage")
    evaluations: int = Field(description="fitness evaluations made, over all stages")


class SearchState(BaseModel):
    """Everything needed to continue a search: committed after each generation, JSON round-trips exactly."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    iteration: int = Field(description="outer iteration this search belongs to")
    generation: int = Field(0, ge=0, description="generations completed")
    parent: list[int] = Field(description="levels of the current parent, one per gene; all zeros at the start")
    parent_fitness: float | None = Field(None, description="the parent's fitness when it was selected")
    history: list[GenerationRecord] = Field(default_factory=list, description="one record per generation")
    rng: dict[str, Any] = Field(description="numpy PCG64 state (bit_generator.state) after the last generation")

    @field_validator("rng")
    @classmethod
    def _pcg64_state(cls, state: dict[str, Any]) -> dict[str, Any]:
        if state.get("bit_generator") != "PCG64":
            raise ValueError(f"rng must be a numpy PCG64 state, got bit_generator={state.get('bit_generator')!r}")
        return state


def restore_rng(state: dict[str, Any]) -> np.random.Generator:
    """A generator continuing exactly from a serialised PCG64 state."""
    bit_generator = np.random.PCG64()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def initial_state(
    genes: Sequence[Sublayer], seed: int, iteration: int, parent: Sequence[int] | None = None
) -> SearchState:
    """The state before generation 1: the parent is all zeros (the supernet's centres) unless given.

    Raises:
        SearchError: if ``parent`` does not fit the genome.
    """
    levels = [0] * len(genes) if parent is None else list(parent)
    require_fits(levels, genes, "parent")
    rng = np.random.Generator(np.random.PCG64(seed))
    return SearchState(iteration=iteration, parent=levels, rng=rng.bit_generator.state)


def run_generation(
    state: SearchState,
    genes: Sequence[Sublayer],
    evaluate: Evaluate,
    cfg: SearchConfig,
    n_windows: int,
    seq_len: int,
    progress: Progress | None = None,
    guide: SearchGuide | None = None,
) -> SearchState:
    """One generation: offspring of the parent, multi-stage selection, and the next state (``state`` is unchanged).

    Args:
        state: the state after the previous generation (or ``initial_state``).
        genes: the genome the state's levels refer to.
        evaluate: ``(levels, window ids) -> fitness``, lower is better.
        cfg: search settings.
        n_windows: calibration windows available to the evaluator.
        seq_len: tokens per window.
        progress: ``(done, total)`` evaluations of this generation.
        guide: the parameter budget and weighted draws (``SearchGuide``); None is the reference's walk.

    Raises:
        SearchError: if the state's parent does not fit ``genes`` (a state resumed against another plan).
    """
    require_fits(state.parent, genes, f"search state of iteration {state.iteration}, generation {state.generation}")
    rng = restore_rng(state.rng)
    children = offspring(state.parent, genes, rng, cfg.offspring, cfg.max_swaps, guide)
    chosen = select(children, state.parent, evaluate, cfg, rng, n_windows, seq_len, progress)
    record = GenerationRecord(
        generation=state.generation + 1,
        fitness=chosen.fitness,
        candidates=len(children),
        evaluations=chosen.evaluations,
    )
    return state.model_copy(
        update={
            "generation": record.generation,
            "parent": chosen.best,
            "parent_fitness": chosen.fitness,
            "history": [*state.history, record],
            "rng": rng.bit_generator.state,
        }
    )


def run_search(
    state: SearchState,
    genes: Sequence[Sublayer],
    evaluate: Evaluate,
    cfg: SearchConfig,
    n_windows: int,
    seq_len: int,
    on_generation: Callable[[SearchState], None] | None = None,
    progress: Progress | None = None,
    guide: SearchGuide | None = None,
) -> SearchState:
    """Generations from ``state`` until ``cfg.generations`` are complete.

    ``on_generation`` sees every new state (the orchestrator commits it); a search resumed from any of those states,
    after a JSON round-trip, ends exactly where this one does. ``progress`` is passed to each generation.
    """
    while state.generation < cfg.generations:
        state = run_generation(state, genes, evaluate, cfg, n_windows, seq_len, progress, guide)
        record = state.history[-1]
        log.info(
            "iteration %d generation %d/%d: fitness %.6g (%d offspring, %d evaluations)",
            state.iteration,
            state.generation,
            cfg.generations,
            record.fitness,
            record.candidates,
            record.evaluations,
        )
        if on_generation is not None:
            on_generation(state)
    return state
