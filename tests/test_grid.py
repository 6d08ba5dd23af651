"""Integer grid bookkeeping: levels cut short at the edges, steps floored at one group, exact budgets."""

from __future__ import annotations

import pytest

from tyr_core.errors import GridError
from tyr_core.grid import (
    IterationPlan,
    build_sublayers,
    distribute,
    interval_groups,
    make_grid,
    recentre,
    uniform_centres,
)


def test_grid_of_nine_levels_is_cut_short_not_shifted():
    assert make_grid(groups=8, centre=4, step=1, num_levels=9) == (-4, 4)
    assert make_grid(groups=8, centre=1, step=1, num_levels=9) == (-1, 4)
    assert make_grid(groups=8, centre=8, step=1, num_levels=9) == (-4, 0)
    assert make_grid(groups=1536, centre=768, step=192, num_levels=9) == (-4, 4)  # 0% .. 100%


def test_steps_are_whole_groups_and_never_below_one():
    assert interval_groups(1536, 0.125) == 192
    assert interval_groups(9, 0.125) == 1
    assert interval_groups(9, 0.015625) == 1
    assert interval_groups(40, 0.0625) == 2  # 2.5 heads rounds to whole heads


def test_uniform_centres_hit_the_budget_exactly_and_spread_evenly():
    centres = uniform_centres([9] * 30, 0.5, "attn", 0.02)
    assert sum(centres) == 135 and set(centres) == {4, 5}
    assert centres[:4] == [5, 4, 5, 4]


def test_target_the_model_cannot_express_names_the_type():
    with pytest.raises(GridError, match="attn.*nearest reachable sparsity is 0.2500"):
        uniform_centres([4, 4], 0.3, "attn", 0.01)


def test_distribute_is_exact_for_unequal_groups():
    assert sum(distribute(7, [3, 5, 9])) == 7


def test_even_levels_and_bad_centres_are_rejected():
    with pytest.raises(GridError, match="odd"):
        build_sublayers({"attn": 4, "mlp": 8}, 1, {"attn": [2], "mlp": [4]}, 0.25, 4)
    with pytest.raises(GridError, match="outside"):
        build_sublayers({"attn": 4, "mlp": 8}, 1, {"attn": [5], "mlp": [4]}, 0.25, 9)


def test_recentre_moves_centres_by_the_winning_levels():
    subs = build_sublayers({"attn": 8, "mlp": 64}, 2, {"attn": [4, 4], "mlp": [32, 32]}, 0.125, 9)
    centres = recentre(subs, [1, -2, -1, 2])
    assert centres == {"attn": [5, 3], "mlp": [16, 48]}
    assert sum(centres["attn"]) == 8 and sum(centres["mlp"]) == 64
    with pytest.raises(GridError, match="outside the supernet grid"):
        subs[0].removed(9)


def test_an_iteration_plan_round_trips_its_json_and_lists_what_the_build_prunes():
    subs = build_sublayers({"attn": 4, "mlp": 8}, 2, {"attn": [0, 2], "mlp": [4, 4]}, 0.25, 5)
    plan = IterationPlan(1, tuple(subs))
    as_json = {"iteration": 1, "sublayers": [vars(s) for s in subs]}
    assert plan.to_json() == as_json and IterationPlan.from_json(as_json) == plan
    assert plan.layers() == [0, 1]
    assert plan.levels_of(0) == [-2, -1, 0, 1, 2]  # the MLP's grid; attention's is cut short at 0 groups removed
    assert plan.kinds_at(0, -1) == ["mlp"] and plan.kinds_at(0, 1) == ["attn", "mlp"]
