"""The sparsity-shift search: budgets, bounds, kinds, convergence, determinism and exact resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError

from tyr_core.grid import build_sublayers
from tyr_core.search import (
    SearchConfig,
    SearchState,
    budget_preserved,
    initial_state,
    mutate,
    offspring,
    removed_groups,
    run_generation,
    run_search,
    within_bounds,
)


def _genes(layers=30):
    rng = np.random.default_rng(0)
    centres = {
        "attn": [int(c) for c in rng.integers(0, 10, layers)],
        "mlp": [int(c) for c in rng.integers(0, 1537, layers)],
    }
    return build_sublayers({"attn": 9, "mlp": 1536}, layers, centres, 0.125, 9)


def test_thousands_of_mutations_keep_both_budgets_bounds_and_kinds():
    genes = _genes()
    rng = np.random.default_rng(1)
    parent = [0] * len(genes)
    swaps = Counter()
    for _ in range(5000):
        child = mutate(parent, genes, rng)
        assert budget_preserved(child, parent, genes)
        assert within_bounds(child, genes)
        moved = {genes[i].kind for i, (a, b) in enumerate(zip(child, parent, strict=True)) if a != b}
        swaps[sum(abs(a - b) for a, b in zip(child, parent, strict=True))] += 1
        parent = child if rng.random() < 0.5 else parent  # wander, so edges get exercised
        assert len(moved) <= 2
    assert removed_groups(parent, genes) == removed_groups([0] * len(genes), genes)


def test_number_of_swaps_follows_7_5_3_1_over_16():
    rng = np.random.default_rng(2)
    counts = Counter(min(int(rng.integers(1, 5)), int(rng.integers(1, 5))) for _ in range(16000))
    for n, p in zip((1, 2, 3, 4), (7, 5, 3, 1), strict=True):
        assert abs(counts[n] / 16000 - p / 16) < 0.015


def test_offspring_are_unique():
    genes = _genes(4)
    kids = offspring([0] * 8, genes, np.random.default_rng(3), 64)
    assert len({tuple(k) for k in kids}) == len(kids) == 64


def _convex(genes, target):
    """Fitness with a known optimum: squared distance of each gene's removed groups to a target split."""

    def evaluate(levels, _windows):
        return float(sum((g.removed(lv) - t) ** 2 for g, lv, t in zip(genes, levels, target, strict=True)))

    return evaluate


def test_search_converges_to_the_known_optimum_and_is_deterministic():
    genes = build_sublayers({"attn": 8, "mlp": 64}, 4, {"attn": [4] * 4, "mlp": [32] * 4}, 0.125, 9)
    # the optimum moves attention groups from layers 2,3 to 0,1 and MLP from 0 to 3; same totals
    target = [g.removed(lv) for g, lv in zip(genes, [2, -1, 1, 0, -1, 0, -2, 1], strict=True)]
    cfg = SearchConfig(offspring=16, generations=40, stage_tokens=[64, 128], survivors=[4, 1])
    a = run_search(initial_state(genes, 7, 1), genes, _convex(genes, target), cfg, 16, 32)
    b = run_search(initial_state(genes, 7, 1), genes, _convex(genes, target), cfg, 16, 32)
    assert a.parent == [2, -1, 1, 0, -1, 0, -2, 1] and a.parent_fitness == 0.0
    assert a == b


def test_resume_from_serialised_state_reproduces_the_uninterrupted_search():
    genes = _genes(6)
    noise = np.random.default_rng(5).normal(size=(12, 64))

    def evaluate(levels, windows):  # depends on the minibatch: resume must replay the RNG exactly
        return float(sum(noise[i, w % 64] * lv for i, lv in enumerate(levels) for w in windows))

    cfg = SearchConfig(offspring=8, generations=6, stage_tokens=[32, 64, 128], survivors=[4, 2, 1])
    full = run_search(initial_state(genes, 11, 1), genes, evaluate, cfg, 40, 16)
    state = initial_state(genes, 11, 1)
    for _ in range(3):
        state = run_generation(state, genes, evaluate, cfg, 40, 16)
    resumed = SearchState.model_validate_json(state.model_dump_json())
    assert run_search(resumed, genes, evaluate, cfg, 40, 16) == full


def test_elitism_never_loses_the_parent_on_a_deterministic_fitness():
    genes = _genes(3)
    target = [g.removed(0) for g in genes]  # the parent is optimal
    cfg = SearchConfig(offspring=8, generations=5, stage_tokens=[16, 16], survivors=[2, 1])
    state = run_search(initial_state(genes, 0, 1), genes, _convex(genes, target), cfg, 8, 16)
    assert state.parent == [0] * len(genes)


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="survivors"):
        SearchConfig(stage_tokens=[1, 2], survivors=[2, 2])
    with pytest.raises(ValidationError, match="offspring"):
        SearchConfig(offspring=2, survivors=[16, 4, 1])
    with pytest.raises(ValidationError, match="bogus"):
        SearchConfig(bogus=1)
