"""The guided search: the sensitivity scan and its allocation, weighted gene draws, paired selection against the
parent, and the reference's behaviour kept when none of it is asked for. No model involved."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tyr_core.grid import build_sublayers
from tyr_core.search import (
    SearchConfig,
    SearchGuide,
    check_budget,
    initial_state,
    paired_choice,
    run_search,
    select,
    shift_one_level,
)
from tyr_core.sensitivity import (
    SensitivityScan,
    make_guide,
    mutation_weights,
    run_scan,
    scan_allocation,
    scan_window_ids,
    start_levels,
)


def genome():
    return build_sublayers({"attn": 4, "mlp": 8}, 6, {"attn": [2] * 6, "mlp": [4] * 6}, 0.25, 5)


def steep_cost(genes):
    """Separable: layer 0 is steep (sparser costs a lot, denser gains), the rest nearly flat."""
    slope = [5.0 if g.layer == 0 else 0.01 * (g.layer + 1) for g in genes]
    return lambda levels: sum(s * lv + 0.1 * lv * lv for s, lv in zip(slope, levels, strict=True))


def test_scan_measures_every_one_level_move_and_its_cost():
    genes = genome()
    cost = steep_cost(genes)
    windows = scan_window_ids(512, 16, 64)
    assert windows == [0, 2, 4, 6, 8, 10, 12, 14]  # 8 windows of 64 tokens, spread evenly
    scan = run_scan([0] * len(genes), genes, lambda lv, _w: cost(lv), windows, 1, 64)
    assert scan.evaluations == 1 + sum((g.lo < 0) + (g.hi > 0) for g in genes)
    assert scan.tokens == scan.evaluations * 8 * 64
    assert scan.sparser[0] == pytest.approx(5.1) and scan.denser[0] == pytest.approx(-4.9)
    assert SensitivityScan.model_validate_json(scan.model_dump_json()) == scan


def test_the_scan_allocation_densifies_the_steep_genes_and_keeps_the_group_budgets():
    genes = genome()
    cost = steep_cost(genes)
    scan = run_scan([0] * len(genes), genes, lambda lv, _w: cost(lv), [0], 1, 64)
    levels = scan_allocation(scan, genes)
    assert levels[0] == -1 and levels[1] == -1  # layer 0's attention and MLP one level denser
    assert check_budget(levels, [0] * len(genes), genes)
    assert cost(levels) < cost([0] * len(genes))


def test_sensitivity_weights_draw_steep_genes_denser_and_flat_genes_sparser():
    genes = genome()
    cost = steep_cost(genes)
    scan = run_scan([0] * len(genes), genes, lambda lv, _w: cost(lv), [0], 1, 64)
    denser, sparser = mutation_weights(scan, 0.1)
    guide = SearchGuide(denser=denser, sparser=sparser)
    rng = np.random.default_rng(0)
    drawn_d, drawn_i = Counter(), Counter()
    for _ in range(2000):
        child = [0] * len(genes)
        d, i = shift_one_level(child, genes, rng, guide)
        assert genes[d].kind == genes[i].kind
        drawn_d[genes[d].layer] += 1
        drawn_i[genes[i].layer] += 1
    assert drawn_d[0] > 0.5 * 2000  # uniform would give a sixth
    assert drawn_i[0] < 0.02 * 2000


def test_paired_choice_keeps_the_parent_unless_a_child_wins_beyond_the_noise():
    parent = [1.0, 2.0, 3.0, 4.0]
    noisy = [0.5, 2.6, 2.4, 4.3]  # lower mean, but not consistently
    steady = [0.9, 1.9, 2.9, 3.9]  # lower on every window
    assert paired_choice([noisy, parent], 1, 1.0) == 1
    assert paired_choice([noisy, steady, parent], 2, 1.0) == 1
    assert paired_choice([noisy, parent], 1, 0.0) == 0  # z = 0: the lower mean wins
    assert paired_choice([[float("nan")] * 4, parent], 1, 1.0) == 1


def test_paired_selection_scores_windows_apart_and_keeps_an_unbeaten_parent():
    cfg = SearchConfig(offspring=4, stage_tokens=[64, 256], survivors=[2, 1], selection="paired")
    calls = []

    def evaluate(levels, windows):
        calls.append(list(windows))
        return float(sum(levels)) * 0.0 + 1.0  # all equal: no child beats the parent

    parent = [0, 0]
    chosen = select([[1, -1], [-1, 1], [2, -2], [-2, 2]], parent, evaluate, cfg, np.random.default_rng(0), 16, 64)
    assert chosen.best == parent
    assert all(len(w) == 1 for w in calls[-3 * 4 :])  # the last stage: 4 windows, one call each, per candidate


def test_defaults_are_the_reference_walk():
    genes = genome()
    cfg = SearchConfig()
    assert make_guide(cfg, genes, None, None) is None
    assert start_levels(cfg, genes, None, None) == [0] * len(genes)
    assert not cfg.needs_scan and cfg.selection == "mean" and cfg.exchange == "none" and cfg.attention == "heads"


def test_a_guided_search_starts_from_the_scan_and_pushes_the_steep_genes_to_their_edge():
    genes = genome()
    cost = steep_cost(genes)
    evaluate = lambda lv, _w: cost(lv)  # noqa: E731
    cfg = SearchConfig(
        offspring=8, generations=6, stage_tokens=[64, 128], survivors=[2, 1], start="scan", mutation="sensitivity"
    )
    scan = run_scan([0] * len(genes), genes, evaluate, [0], 1, 64)
    start = start_levels(cfg, genes, scan, None)
    guide = make_guide(cfg, genes, scan, None)
    guided = run_search(initial_state(genes, 1, 1, start), genes, evaluate, cfg, 16, 64, guide=guide)
    assert check_budget(guided.parent, [0] * len(genes), genes)
    assert cost(guided.parent) <= cost(start) < cost([0] * len(genes))
    assert guided.parent[0] == guided.parent[1] == -2  # layer 0 as dense as its grid allows
