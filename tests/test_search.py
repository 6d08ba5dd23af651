"""The sparsity-shift search (docs/algorithm.md): budgets, bounds, kinds, swap counts, offspring, selection, convergence
to a known optimum, determinism, exact resume from JSON, elitism and config validation. No model involved."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError

from tyr_core import search
from tyr_core.errors import SearchError
from tyr_core.grid import Sublayer, build_sublayers
from tyr_core.search import (
    SearchConfig,
    SearchState,
    check_bounds,
    check_budget,
    draw_stage_windows,
    draw_swap_count,
    initial_state,
    keep_best,
    mutate,
    offspring,
    planned_evaluations,
    removed_groups,
    run_generation,
    run_search,
    select,
    shift_one_level,
    stage_window_count,
)

# --- genomes ----------------------------------------------------------------------------------------------------------


def realistic_genome(layers: int = 30) -> list[Sublayer]:
    """32 heads / 1536 neurons per layer at a 12.5% interval, centres varying over depth and hitting both edges, so
    many grids are cut short."""
    rng = np.random.default_rng(0)
    attn = [int(c) for c in rng.integers(0, 33, layers)]
    mlp = [int(c) for c in rng.integers(0, 1537, layers)]
    attn[:4], mlp[:4] = [0, 32, 1, 31], [0, 1536, 100, 1500]  # dense, removed, one step from each edge
    return build_sublayers({"attn": 32, "mlp": 1536}, layers, {"attn": attn, "mlp": mlp}, 0.125, 9)


def level_sums(levels: list[int], genes: list[Sublayer]) -> Counter:
    sums: Counter = Counter()
    for gene, level in zip(genes, levels, strict=True):
        sums[gene.kind] += level
    return sums


def test_realistic_genome_has_cut_short_grids_at_both_edges():
    genes = realistic_genome()
    assert any(g.lo == 0 for g in genes) and any(g.hi == 0 for g in genes)
    assert any(g.lo == -4 and g.hi == 4 for g in genes)
    assert {g.step for g in genes if g.kind == "attn"} == {4} and {g.step for g in genes if g.kind == "mlp"} == {192}


# --- constraints --------------------------------------------------------------------------------------------------


def test_removed_groups_and_the_named_predicates():
    genes = [Sublayer(0, "attn", 8, 4, 2, -2, 2), Sublayer(0, "mlp", 64, 32, 8, -4, 4)]
    assert removed_groups([1, -2], genes) == {"attn": 6, "mlp": 16}
    assert check_budget([0, 0], [0, 0], genes)
    assert not check_budget([1, 0], [0, 0], genes)
    assert check_bounds([2, -4], genes)
    assert not check_bounds([3, 0], genes)
    assert not check_bounds([0], genes)


# --- mutation -----------------------------------------------------------------------------------------------------


def test_thousands_of_mutations_preserve_both_budgets_exactly_and_stay_on_the_grid():
    genes = realistic_genome()
    rng = np.random.default_rng(1)
    start = [0] * len(genes)
    budget = removed_groups(start, genes)
    levels, seen_lo, seen_hi = start, set(), set()
    for _ in range(4000):
        child = mutate(levels, genes, rng)
        assert check_bounds(child, genes)
        assert removed_groups(child, genes) == budget
        assert level_sums(child, genes) == level_sums(levels, genes)
        seen_lo |= {j for j, g in enumerate(genes) if child[j] == g.lo and g.lo < g.hi}
        seen_hi |= {j for j, g in enumerate(genes) if child[j] == g.hi and g.lo < g.hi}
        levels = child  # random walk: the edges of the grids get exercised
    assert len(seen_lo) > 30 and len(seen_hi) > 30  # the walk really pressed against the bounds


def test_swaps_never_mix_kinds_whatever_the_gene_order():
    genes = realistic_genome()
    order = np.random.default_rng(2).permutation(len(genes))
    genes = [genes[j] for j in order]  # index parity no longer says anything about the kind
    rng = np.random.default_rng(3)
    child = [0] * len(genes)
    budget = removed_groups(child, genes)
    for _ in range(3000):
        d, i = shift_one_level(child, genes, rng)
        assert genes[d].kind == genes[i].kind
        assert check_bounds(child, genes) and removed_groups(child, genes) == budget


def test_number_of_shifts_per_mutation_follows_7_5_3_1_sixteenths(monkeypatch):
    drawn: list[int] = []

    def spy(rng, max_swaps=4):
        drawn.append(draw_swap_count(rng, max_swaps))
        return drawn[-1]

    monkeypatch.setattr(search, "draw_swap_count", spy)
    genes = realistic_genome()
    rng = np.random.default_rng(4)
    parent = [0] * len(genes)
    exact = 0
    for _ in range(8000):
        moved = sum(abs(c - p) for c, p in zip(mutate(parent, genes, rng), parent, strict=True))
        assert moved <= 2 * drawn[-1]
        exact += moved == 2 * drawn[-1]
    counts = Counter(drawn)
    for n, p in zip((1, 2, 3, 4), (7, 5, 3, 1), strict=True):
        assert abs(counts[n] / len(drawn) - p / 16) < 0.015, (n, counts)
    assert exact / len(drawn) > 0.8  # the drawn shifts really happen (few cancel or are d == i no-ops)


def test_swap_count_for_other_maxima():
    rng = np.random.default_rng(5)
    counts = Counter(draw_swap_count(rng, 2) for _ in range(8000))
    assert abs(counts[1] / 8000 - 3 / 4) < 0.015 and set(counts) == {1, 2}
    assert {draw_swap_count(rng, 1) for _ in range(50)} == {1}


def test_a_kind_with_no_legal_pair_is_left_alone():
    frozen_attn = [Sublayer(j, "attn", 8, 4, 1, 0, 0) for j in range(3)]  # a single copy each
    topped_attn = [Sublayer(j, "attn", 8, 8, 1, -2, 0) for j in range(3)]  # can only go denser: no sparser partner
    mlp = [Sublayer(j, "mlp", 64, 32, 8, -2, 2) for j in range(3)]
    rng = np.random.default_rng(6)
    for attn in (frozen_attn, topped_attn):
        genes = [g for pair in zip(attn, mlp, strict=True) for g in pair]
        moved_mlp = False
        for _ in range(300):
            child = mutate([0] * 6, genes, rng)
            assert [child[j] for j in range(0, 6, 2)] == [0, 0, 0]
            assert check_budget(child, [0] * 6, genes) and check_bounds(child, genes)
            moved_mlp |= child != [0] * 6
        assert moved_mlp


def test_a_genome_with_no_legal_move_at_all_returns_the_parent_without_hanging():
    genes = [Sublayer(0, "attn", 8, 8, 1, -2, 0), Sublayer(0, "mlp", 64, 0, 8, 0, 2)]
    rng = np.random.default_rng(7)
    assert mutate([0, 0], genes, rng) == [0, 0]
    assert shift_one_level([0, 0], genes, rng) is None
    assert offspring([0, 0], genes, rng, 16) == [[0, 0]]


def test_a_parent_off_the_grid_is_refused_naming_the_sublayer():
    genes = realistic_genome(4)
    with pytest.raises(SearchError, match="layers.0"):
        mutate([-1] + [0] * 7, genes, np.random.default_rng(0))  # layer 0 attention is dense: lo == 0
    with pytest.raises(SearchError, match="8 sublayers"):
        mutate([0] * 7, genes, np.random.default_rng(0))


# --- offspring ----------------------------------------------------------------------------------------------------


def test_offspring_are_unique_and_legal():
    genes = realistic_genome()
    parent = [0] * len(genes)
    kids = offspring(parent, genes, np.random.default_rng(8), 128)
    assert len(kids) == 128 == len({tuple(k) for k in kids})
    assert all(check_budget(k, parent, genes) and check_bounds(k, genes) for k in kids)


def test_offspring_of_a_tiny_space_are_all_of_it_and_may_include_the_parent():
    genes = [Sublayer(0, "mlp", 64, 32, 8, -1, 1), Sublayer(1, "mlp", 64, 32, 8, -1, 1)]
    kids = offspring([0, 0], genes, np.random.default_rng(9), 50)
    assert sorted(map(tuple, kids)) == [(-1, 1), (0, 0), (1, -1)]  # the whole budget-preserving space


# --- selection ----------------------------------------------------------------------------------------------------


def test_stage_windows_are_distinct_fresh_and_sized_by_tokens():
    rng = np.random.default_rng(10)
    batch = draw_stage_windows(rng, 2048, 100, 512)
    assert len(batch) == 4 == len(set(batch)) and batch == sorted(batch) and all(0 <= w < 100 for w in batch)
    assert len(draw_stage_windows(rng, 2049, 100, 512)) == 5  # ceil
    assert len(draw_stage_windows(rng, 10, 100, 512)) == 1  # at least one window
    assert draw_stage_windows(rng, 10**6, 7, 512) == list(range(7))  # capped at what exists
    with pytest.raises(SearchError):
        draw_stage_windows(rng, 10, 0, 512)


def _recording(fitness):
    calls: list[tuple[list[int], list[int]]] = []

    def evaluate(levels, windows):
        calls.append((levels, windows))
        return fitness(levels)

    return evaluate, calls


def test_selection_scores_each_stage_on_one_fresh_batch_and_adds_the_parent_only_at_the_last_stage():
    cfg = SearchConfig(offspring=8, stage_tokens=[40, 40, 80], survivors=[4, 2, 1])
    candidates = [[j, -j] for j in range(1, 9)]
    evaluate, calls = _recording(lambda c: float(c[0]))  # the parent [0, 0] is strictly best
    chosen = select(candidates, [0, 0], evaluate, cfg, np.random.default_rng(11), 1000, 10)
    assert chosen.best == [0, 0] and chosen.fitness == 0.0 and chosen.evaluations == 8 + 4 + 3
    stages = [calls[:8], calls[8:12], calls[12:]]
    assert [c for c, _ in stages[1]] == [[1, -1], [2, -2], [3, -3], [4, -4]]
    assert [c for c, _ in stages[2]] == [[1, -1], [2, -2], [0, 0]]
    assert all([0, 0] != c for c, _ in calls[:12])
    batches = [{tuple(w) for _, w in stage} for stage in stages]
    assert all(len(b) == 1 for b in batches)  # every candidate of a stage sees the same windows
    sizes = [len(next(iter(b))) for b in batches]
    assert sizes == [4, 4, 8]
    assert len({next(iter(b)) for b in batches}) == 3  # a fresh minibatch per stage, even of the same size


def test_selection_does_not_duplicate_a_parent_that_survived():
    cfg = SearchConfig(offspring=4, stage_tokens=[10, 10], survivors=[2, 1])
    evaluate, calls = _recording(lambda c: float(abs(c[0])))
    progress: list[tuple[int, int]] = []
    chosen = select(
        [[0, 0], [1, -1], [2, -2]],
        [0, 0],
        evaluate,
        cfg,
        np.random.default_rng(12),
        10,
        10,
        lambda d, t: progress.append((d, t)),
    )
    assert chosen.best == [0, 0] and chosen.evaluations == 3 + 2
    assert [tuple(c) for c, _ in calls[3:]] == [(0, 0), (1, -1)]
    assert [d for d, _ in progress] == list(range(1, 6)) and progress[-1] == (5, 5)


def test_progress_counts_every_evaluation_up_to_the_planned_total():
    cfg = SearchConfig(offspring=8, stage_tokens=[10, 20, 40], survivors=[4, 2, 1])
    progress: list[tuple[int, int]] = []
    evaluate, _ = _recording(lambda c: float(c[0]))
    chosen = select(
        [[j, -j] for j in range(1, 9)],
        [0, 0],
        evaluate,
        cfg,
        np.random.default_rng(13),
        50,
        10,
        lambda d, t: progress.append((d, t)),
    )
    assert planned_evaluations(8, cfg.survivors) == 15 == chosen.evaluations
    assert progress == [(d, 15) for d in range(1, 16)]


def test_ties_keep_the_pool_order_and_nan_ranks_last():
    pool = [[0], [1], [2], [3]]
    assert keep_best(pool, [1.0, 0.5, 0.5, 1.0], 3) == ([[1], [2], [0]], [0.5, 0.5, 1.0])
    best, scores = keep_best(pool, [math.nan, 2.0, 1.0, 3.0], 2)
    assert best == [[2], [1]] and scores == [1.0, 2.0]


# --- search: convergence, determinism, resume, elitism ------------------------------------------------------------


def convex_genome() -> list[Sublayer]:
    """5 layers x 2 kinds; several grids are cut short at 0% or 100% (centres 2/14 heads, 32/224 neurons)."""
    centres = {"attn": [8, 2, 14, 8, 6], "mlp": [128, 32, 224, 96, 160]}
    return build_sublayers({"attn": 16, "mlp": 256}, 5, centres, 0.125, 9)


def convex_cost(genes: list[Sublayer]):
    """Separable convex cost of the groups each sublayer removes, with targets off the grid and the budget."""
    rng = np.random.default_rng(14)
    weights = rng.uniform(0.5, 2.0, len(genes))
    targets = [g.removed(0) + rng.uniform(-3.5, 3.5) * g.step for g in genes]

    def cost(levels) -> float:
        return float(
            sum(
                w * ((g.removed(lv) - t) / g.step) ** 2
                for w, g, lv, t in zip(weights, genes, levels, targets, strict=True)
            )
        )

    return cost


def brute_force_optimum(genes: list[Sublayer], cost) -> tuple[list[int], float, float]:
    """The best budget-preserving assignment (level sum 0 per kind, every step equal within a kind) and the
    runner-up's cost, by enumerating each kind separately (the cost is separable)."""
    best = [0] * len(genes)
    runner_up = math.inf
    for kind in ("attn", "mlp"):
        idx = [j for j, g in enumerate(genes) if g.kind == kind]
        scored = []
        for combo in itertools.product(*(genes[j].levels for j in idx)):
            if sum(combo) == 0:
                levels = list(best)
                for j, lv in zip(idx, combo, strict=True):
                    levels[j] = lv
                scored.append((cost(levels), combo))
        scored.sort()
        for j, lv in zip(idx, scored[0][1], strict=True):
            best[j] = lv
        runner_up = min(runner_up, scored[1][0] - scored[0][0])
    return best, cost(best), runner_up


def test_search_converges_to_the_known_optimum_of_a_convex_budgeted_cost():
    genes = convex_genome()
    cost = convex_cost(genes)
    optimum, optimum_cost, gap = brute_force_optimum(genes, cost)
    assert gap > 1e-6 and optimum != [0] * len(genes)  # unique, and not where the search starts
    cfg = SearchConfig(offspring=32, generations=40, stage_tokens=[64, 256], survivors=[8, 1])
    state = run_search(initial_state(genes, 7, 1), genes, lambda lv, _w: cost(lv), cfg, 16, 32)
    assert state.parent == optimum
    assert state.parent_fitness == pytest.approx(optimum_cost)
    fitness = [r.fitness for r in state.history]
    assert all(b <= a for a, b in itertools.pairwise(fitness))  # elitism on a deterministic fitness
    assert len(state.history) == 40 and state.generation == 40


def test_same_seed_same_search_other_seed_other_path():
    genes = convex_genome()
    cost = convex_cost(genes)
    cfg = SearchConfig(offspring=16, generations=6, stage_tokens=[64, 256], survivors=[4, 1])
    a = run_search(initial_state(genes, 3, 1), genes, lambda lv, _w: cost(lv), cfg, 16, 32)
    b = run_search(initial_state(genes, 3, 1), genes, lambda lv, _w: cost(lv), cfg, 16, 32)
    c = run_search(initial_state(genes, 4, 1), genes, lambda lv, _w: cost(lv), cfg, 16, 32)
    assert a.model_dump_json() == b.model_dump_json()
    assert a.rng != c.rng and [r.fitness for r in a.history] != [r.fitness for r in c.history]


def noisy_evaluator(genes: list[Sublayer]):
    """A fitness that depends on the minibatch, so a resume that replays the RNG differently gives other results."""
    cost = convex_cost(genes)
    noise = np.random.default_rng(15).normal(size=(len(genes), 64))

    def evaluate(levels, windows):
        return cost(levels) + float(sum(noise[j, w] * lv for j, lv in enumerate(levels) for w in windows))

    return evaluate


def test_resuming_from_any_committed_json_state_gives_exactly_the_uninterrupted_search():
    genes = convex_genome()
    evaluate = noisy_evaluator(genes)
    cfg = SearchConfig(offspring=12, generations=6, stage_tokens=[32, 64, 256], survivors=[6, 2, 1])
    committed: list[str] = []
    commit = lambda state: committed.append(state.model_dump_json())  # noqa: E731  (what the orchestrator does)
    full = run_search(initial_state(genes, 11, 2), genes, evaluate, cfg, 64, 16, commit)
    assert len(committed) == 6
    for g, text in enumerate([initial_state(genes, 11, 2).model_dump_json(), *committed[:-1]]):
        resumed = SearchState.model_validate_json(text)
        assert resumed.generation == g
        assert run_search(resumed, genes, evaluate, cfg, 64, 16).model_dump_json() == full.model_dump_json()
    # teeth: the same state with a fresh RNG does not reproduce it
    reseeded = SearchState.model_validate_json(committed[2]).model_copy(update={"rng": initial_state(genes, 11, 2).rng})
    assert run_search(reseeded, genes, evaluate, cfg, 64, 16).model_dump_json() != full.model_dump_json()


def test_run_generation_is_pure():
    genes = convex_genome()
    state = initial_state(genes, 0, 1)
    before = state.model_dump_json()
    cfg = SearchConfig(offspring=8, generations=1, stage_tokens=[16], survivors=[1])
    after = run_generation(state, genes, noisy_evaluator(genes), cfg, 64, 16)
    assert state.model_dump_json() == before and after.generation == 1 and after.rng != state.rng


def test_elitism_keeps_an_optimal_parent_for_ever():
    genes = realistic_genome(6)
    parent = [0] * len(genes)

    def evaluate(levels, _windows):  # the parent is the unique optimum; every other candidate is strictly worse
        return float(sum(abs(lv) for lv in levels))

    cfg = SearchConfig(offspring=8, generations=10, stage_tokens=[16, 32], survivors=[2, 1])
    state = run_search(initial_state(genes, 0, 1, parent), genes, evaluate, cfg, 8, 16)
    assert state.parent == parent and all(r.fitness == 0.0 for r in state.history)


def test_a_state_from_another_genome_is_refused():
    genes = convex_genome()
    state = initial_state(genes, 0, 1)
    cfg = SearchConfig(offspring=4, generations=1, stage_tokens=[16], survivors=[1])
    with pytest.raises(SearchError, match="generation 0"):
        run_generation(state, genes[:-2], lambda lv, w: 0.0, cfg, 8, 16)
    with pytest.raises(SearchError):
        initial_state(genes, 0, 1, parent=[9] * len(genes))


def test_search_state_round_trips_infinite_fitness_and_refuses_other_generators():
    genes = convex_genome()
    state = initial_state(genes, 0, 1).model_copy(update={"parent_fitness": math.inf})
    assert SearchState.model_validate_json(state.model_dump_json()) == state
    bad = json.loads(state.model_dump_json())
    bad["rng"]["bit_generator"] = "MT19937"
    with pytest.raises(ValidationError, match="rng"):
        SearchState.model_validate(bad)


# --- config ---------------------------------------------------------------------------------------------------------


def test_defaults_are_the_papers():
    cfg = SearchConfig()
    assert (cfg.offspring, cfg.generations, cfg.max_swaps) == (128, 50, 4)
    assert cfg.stage_tokens == [2048, 16384, 131072] and cfg.survivors == [16, 4, 1]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"stage_tokens": [1, 2], "survivors": [1]}, "stage_tokens"),
        ({"stage_tokens": [1, 2], "survivors": [1]}, "survivors"),
        ({"survivors": [4, 16, 1]}, "survivors"),
        ({"survivors": [16, 4, 2]}, "survivors"),
        ({"stage_tokens": [0, 16, 32]}, "stage_tokens"),
        ({"stage_tokens": [32, 16, 64]}, "stage_tokens"),
        ({"offspring": 8}, "offspring"),
        ({"max_swaps": 0}, "max_swaps"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as err:
        SearchConfig(**kwargs)
    assert any(field in f"{'.'.join(map(str, e['loc']))} {e['msg']}" for e in err.value.errors())


def test_config_is_frozen():
    cfg = SearchConfig()
    with pytest.raises(ValidationError):
        cfg.offspring = 3


def test_a_stage_scores_at_least_min_stage_windows():
    assert stage_window_count(512, 64, 512) == 1
    assert stage_window_count(512, 64, 512, min_windows=4) == 4
    assert stage_window_count(8192, 64, 512, min_windows=4) == 16  # the token count still rules above it
    assert stage_window_count(512, 3, 512, min_windows=4) == 3  # capped at the windows there are
    rng = np.random.default_rng(0)
    assert len(draw_stage_windows(rng, 100, 64, 512, min_windows=5)) == 5
