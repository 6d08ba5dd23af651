"""The evolutionary sparsity-shift search (ALGORITHM.md §6), pure and seeded.

A candidate is a list of levels, one per gene (``grid.Sublayer``, with an explicit kind tag). Mutations move one
level of budget from one sublayer to another of the same kind, so the attention and MLP budgets never change.
Selection is multi-stage and elitist. The evaluator is injected; the RNG is explicit and serialised with the
state, so a search resumed from any committed generation reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .grid import Sublayer

Evaluate = Callable[[list[int], list[int]], float]  # (levels, window ids) -> fitness, lower is better


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    offspring: int = Field(128, ge=1, description="unique children per generation")
    generations: int = Field(50, ge=0, description="generations per iteration")
    stage_tokens: list[int] = Field(default_factory=lambda: [2048, 16384, 131072], description="tokens per stage")
    survivors: list[int] = Field(default_factory=lambda: [16, 4, 1], description="candidates kept after each stage")
    max_swaps: int = Field(4, ge=1, description="most sparsity shifts per mutation")
    prefix_sharing: bool = Field(True, description="reuse the parent's hidden states for unchanged layers")

    @model_validator(mode="after")
    def _stages(self) -> SearchConfig:
        if len(self.stage_tokens) != len(self.survivors) or not self.survivors:
            raise ValueError("stage_tokens and survivors must be non-empty lists of the same length")
        if any(t <= 0 for t in self.stage_tokens) or self.stage_tokens != sorted(self.stage_tokens):
            raise ValueError("stage_tokens must be positive and non-decreasing")
        if self.survivors != sorted(self.survivors, reverse=True) or self.survivors[-1] != 1:
            raise ValueError("survivors must be non-increasing and end with 1")
        if self.offspring < self.survivors[0]:
            raise ValueError(f"offspring ({self.offspring}) must be at least survivors[0] ({self.survivors[0]})")
        return self


class GenerationRecord(BaseModel):
    generation: int
    fitness: float
    candidates: int
    evaluations: int


class SearchState(BaseModel):
    """Everything needed to continue a search: serialise it after each generation."""

    iteration: int
    generation: int = 0
    parent: list[int]
    parent_fitness: float | None = None
    history: list[GenerationRecord] = Field(default_factory=list)
    rng: dict


def initial_state(genes: list[Sublayer], seed: int, iteration: int, parent: list[int] | None = None) -> SearchState:
    rng = np.random.Generator(np.random.PCG64(seed))
    return SearchState(iteration=iteration, parent=list(parent or [0] * len(genes)), rng=rng.bit_generator.state)


def _rng(state: SearchState) -> np.random.Generator:
    bitgen = np.random.PCG64()
    bitgen.state = state.rng
    return np.random.Generator(bitgen)


def removed_groups(levels: list[int], genes: list[Sublayer]) -> dict[str, int]:
    out: dict[str, int] = {}
    for gene, level in zip(genes, levels, strict=True):
        out[gene.kind] = out.get(gene.kind, 0) + gene.removed(level)
    return out


def budget_preserved(child: list[int], parent: list[int], genes: list[Sublayer]) -> bool:
    """The named constraint of every mutation: each kind removes as many groups as the parent."""
    return removed_groups(child, genes) == removed_groups(parent, genes)


def within_bounds(levels: list[int], genes: list[Sublayer]) -> bool:
    return all(g.lo <= lv <= g.hi for g, lv in zip(genes, levels, strict=True))


def mutate(parent: list[int], genes: list[Sublayer], rng: np.random.Generator, max_swaps: int = 4) -> list[int]:
    """Sparsity shift: 1-``max_swaps`` swaps (P ∝ 7, 5, 3, 1 for 4), each making one gene a level denser and a
    gene of the same kind a level sparser (the same gene is allowed: no change)."""
    child = list(parent)
    swaps = min(int(rng.integers(1, max_swaps + 1)), int(rng.integers(1, max_swaps + 1)))
    kinds = sorted({g.kind for g in genes})
    for _ in range(swaps):
        kind = kinds[int(rng.integers(len(kinds)))]
        denser = [i for i, g in enumerate(genes) if g.kind == kind and child[i] - 1 >= g.lo]
        if not denser:
            continue
        d = denser[int(rng.integers(len(denser)))]
        child[d] -= 1
        sparser = [i for i, g in enumerate(genes) if g.kind == kind and child[i] + 1 <= g.hi]
        s = sparser[int(rng.integers(len(sparser)))]  # never empty: d itself can go back up
        child[s] += 1
    return child


def offspring(parent: list[int], genes: list[Sublayer], rng: np.random.Generator, n: int, max_swaps: int = 4):
    """``n`` unique children (fewer if the space is that small); the parent itself may be among them."""
    seen: set[tuple[int, ...]] = set()
    out: list[list[int]] = []
    for _ in range(50 * n):
        child = mutate(parent, genes, rng, max_swaps)
        if tuple(child) not in seen:
            seen.add(tuple(child))
            out.append(child)
            if len(out) == n:
                break
    return out


def stage_windows(rng: np.random.Generator, tokens: int, n_windows: int, seq_len: int) -> list[int]:
    """A fresh minibatch of distinct calibration windows holding at least ``tokens`` tokens."""
    count = min(n_windows, max(1, math.ceil(tokens / seq_len)))
    return sorted(int(i) for i in rng.choice(n_windows, size=count, replace=False))


def select(
    candidates: list[list[int]],
    parent: list[int],
    evaluate: Evaluate,
    cfg: SearchConfig,
    rng: np.random.Generator,
    n_windows: int,
    seq_len: int,
) -> tuple[list[int], float, int]:
    """Multi-stage elitist selection; returns (best, its fitness on the last stage, evaluations)."""
    pool = [list(c) for c in candidates]
    scores: list[float] = []
    evaluations = 0
    for stage, (tokens, keep) in enumerate(zip(cfg.stage_tokens, cfg.survivors, strict=True)):
        if stage == len(cfg.stage_tokens) - 1 and parent not in pool:
            pool.append(list(parent))  # elitism: the parent competes in the final stage
        batch = stage_windows(rng, tokens, n_windows, seq_len)
        scores = [evaluate(c, batch) for c in pool]
        evaluations += len(pool)
        order = sorted(range(len(pool)), key=lambda i: scores[i])[:keep]
        pool, scores = [pool[i] for i in order], [scores[i] for i in order]
    return pool[0], scores[0], evaluations


def run_generation(
    state: SearchState, genes: list[Sublayer], evaluate: Evaluate, cfg: SearchConfig, n_windows: int, seq_len: int
) -> SearchState:
    """One generation: mutate the parent into offspring, select, and return the next state."""
    rng = _rng(state)
    children = offspring(state.parent, genes, rng, cfg.offspring, cfg.max_swaps)
    best, fitness, evaluations = select(children, state.parent, evaluate, cfg, rng, n_windows, seq_len)
    record = GenerationRecord(
        generation=state.generation + 1, fitness=fitness, candidates=len(children), evaluations=evaluations
    )
    return state.model_copy(
        update={
            "generation": state.generation + 1,
            "parent": best,
            "parent_fitness": fitness,
            "history": [*state.history, record],
            "rng": rng.bit_generator.state,
        }
    )


def run_search(
    state: SearchState,
    genes: list[Sublayer],
    evaluate: Evaluate,
    cfg: SearchConfig,
    n_windows: int,
    seq_len: int,
    on_generation: Callable[[SearchState], None] | None = None,
) -> SearchState:
    """Generations until ``cfg.generations``; ``on_generation`` sees (and may commit) every state."""
    while state.generation < cfg.generations:
        state = run_generation(state, genes, evaluate, cfg, n_windows, seq_len)
        if on_generation:
            on_generation(state)
    return state
