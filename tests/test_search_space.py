"""The search space's bookkeeping: the parameter budget counts what the export removes, plan-time centres meet a
parameter target, whole-attention and MLP-multiple grids, budget-bounded and exchanging mutations, and a search in
the vLLM-servable space whose winner Nemotron-NAS can express."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from flows.recipes import load_recipe
from tyr_core.budget import (
    ParamBudget,
    budget_from_index,
    estimated_removed_fraction,
    fit_budget,
    params_centres,
)
from tyr_core.config import PruneConfig, RunConfig
from tyr_core.errors import ConfigError, ExportError, GridError
from tyr_core.export.nemotron import nemotron_config
from tyr_core.families import Geometry
from tyr_core.fitness import TeacherTopK, write_teacher_topk
from tyr_core.grid import build_sublayers, uniform_centres
from tyr_core.layerwise import LayerwiseModel
from tyr_core.param_count import layout_params
from tyr_core.pipeline import (
    initial_centres,
    placement,
    plan_iteration,
    prune_settings,
    run_iteration_local,
    teacher_forward,
)
from tyr_core.search import SearchGuide, check_bounds, offspring
from tyr_core.supernet import SupernetReader
from tyr_core.supernet_build import SupernetBuild, build_supernet

SMOLLM2 = Geometry("llama", 30, 576, 9, 3, 64, 1536, False, False, False)


def _tiny_supernet(folder, windows, tmp_path, attention="heads", mlp_multiple=1, target=0.5):
    lm = LayerwiseModel(folder)
    prune = PruneConfig(target_sparsity=target, num_levels=5, interval=0.25, mlp_rounds=2, mlp_multiple=mlp_multiple)
    subs = plan_iteration(lm.geometry, prune, 1, initial_centres(lm.geometry, prune, attention), attention)
    index = build_supernet(SupernetBuild(lm, windows, subs, prune_settings(prune), tmp_path))
    return lm, subs, index


def test_the_budget_counts_exactly_what_the_export_removes(tiny_folder, windows, tmp_path):
    folder = tiny_folder("llama")
    lm, subs, index = _tiny_supernet(folder, windows, tmp_path)
    reader, config = SupernetReader(tmp_path), AutoConfig.from_pretrained(folder)
    budget = budget_from_index(lm.geometry, index, subs, 0.5, 0.005)
    rng = np.random.default_rng(0)
    for _ in range(6):
        levels = [int(rng.integers(s.lo, s.hi + 1)) for s in subs]
        exact = layout_params(config, reader.layout(levels))["removed_fraction"]
        assert budget.removed_fraction(levels) == pytest.approx(exact, abs=1e-12)


def test_plan_centres_meet_a_parameter_target_on_smollm2_geometry():
    for target in (0.25, 0.5):
        centres = params_centres(SMOLLM2, target, 0.005, {"attn": 1, "mlp": 1})
        assert abs(estimated_removed_fraction(SMOLLM2, centres) - target) < 0.001
        assert all(0 <= c <= 9 for c in centres["attn"]) and all(0 <= c <= 1536 for c in centres["mlp"])
    groups = {k: uniform_centres([g] * 30, 0.5, k, 0.02) for k, g in (("attn", 9), ("mlp", 1536))}
    assert estimated_removed_fraction(SMOLLM2, groups) < 0.49  # the group budget removes less: KV heads stay


def test_whole_attention_and_mlp_multiples_shape_every_grid():
    prune = PruneConfig(target_sparsity=0.5, mlp_multiple=64)
    centres = initial_centres(SMOLLM2, prune, "whole")
    assert sorted(set(centres["attn"])) == [0, 9] and sum(c == 9 for c in centres["attn"]) == 15
    assert centres["attn"][0] == 0  # the first layer keeps its attention
    for iteration in (1, 2, 3):
        for sub in plan_iteration(SMOLLM2, prune, iteration, centres, "whole"):
            widths = {sub.groups - sub.removed(lv) for lv in sub.levels}
            if sub.kind == "attn":
                assert widths <= {0, 9} and len(widths) == 2
            else:
                assert all(w % 64 == 0 for w in widths)
    with pytest.raises(ConfigError, match="mlp_multiple=100"):
        initial_centres(SMOLLM2, PruneConfig(mlp_multiple=100))
    with pytest.raises(GridError, match="multiples of 64"):
        build_sublayers({"attn": 9, "mlp": 1536}, 1, {"attn": [0], "mlp": [100]}, 0.125, 9, {"attn": 1, "mlp": 64})


def _budget(genes, per_level: dict[str, int], dense: int, target: float, tol: float) -> ParamBudget:
    full = {"attn": 4 * per_level["attn"], "mlp": 8 * per_level["mlp"]}
    kept = tuple({lv: full[g.kind] - g.removed(lv) * per_level[g.kind] for lv in g.levels} for g in genes)
    return ParamBudget(kept, dense, target, tol)


def test_budgeted_offspring_stay_in_the_band_and_exchange_crosses_kinds():
    genes = build_sublayers({"attn": 4, "mlp": 8}, 6, {"attn": [2] * 6, "mlp": [4] * 6}, 0.25, 5)
    budget = _budget(genes, {"attn": 30, "mlp": 20}, 6 * (4 * 30 + 8 * 20), 0.5, 0.03)
    parent = [0] * len(genes)
    assert budget.within(parent)
    rng = np.random.default_rng(3)
    crossed = 0
    for _ in range(30):
        for child in offspring(parent, genes, rng, 8, guide=SearchGuide(budget=budget, exchange=True)):
            assert check_bounds(child, genes) and budget.within(child)
            attn = sum(lv for g, lv in zip(genes, child, strict=True) if g.kind == "attn")
            crossed += attn != 0
    assert crossed > 0  # some children moved budget between kinds


def test_fit_budget_moves_a_start_into_the_band_spreading_its_moves():
    genes = build_sublayers({"attn": 4, "mlp": 8}, 6, {"attn": [2] * 6, "mlp": [4] * 6}, 0.25, 5)
    budget = _budget(genes, {"attn": 30, "mlp": 20}, 6 * (4 * 30 + 8 * 20), 0.6, 0.01)
    order = list(range(len(genes)))[::-1]
    levels = fit_budget([0] * len(genes), genes, budget, order, order)
    assert budget.within(levels) and max(levels) == 1  # one level on several genes, not many on one


def test_a_search_in_the_servable_space_exports_as_nemotron(tiny_folder, windows, tmp_path):
    folder = tiny_folder("llama")
    cfg = RunConfig.model_validate(
        {
            "calibration": {"files": ["-"], "seq_len": 32, "num_windows": 16, "validation_windows": 0},
            "prune": {"iterations": 1, "num_levels": 5, "interval": 0.25, "mlp_rounds": 2, "mlp_multiple": 32},
            "search": {
                "generations": 2,
                "offspring": 4,
                "stage_tokens": [32, 64],
                "survivors": [2, 1],
                "attention": "whole",
                "start": "scan",
                "mutation": "sensitivity",
                "selection": "paired",
            },
            "device": "cpu",
        }
    )
    dense = AutoModelForCausalLM.from_pretrained(folder).eval()
    write_teacher_topk(lambda ids: dense(ids).logits, windows[:8], 32, tmp_path / "teacher", 8)
    geo = LayerwiseModel(folder).geometry
    centres = initial_centres(geo, cfg.prune, "whole")
    res = run_iteration_local(folder, windows[:16], TeacherTopK(tmp_path / "teacher"), cfg, 1, centres, tmp_path)
    layout = SupernetReader(tmp_path / "iter-1").layout(res.levels)
    config = nemotron_config(AutoConfig.from_pretrained(folder), layout)
    assert any(b["attention"]["no_op"] for b in config["block_configs"])
    assert all(int(layout[(layer, "mlp")].kept.numel()) % 32 == 0 for layer in range(geo.num_layers))
    assert res.scan is not None and res.scan["evaluations"] > 1


def test_the_recipes_pick_their_search_spaces():
    def config(name: str) -> RunConfig:
        recipe = load_recipe(name)
        recipe.pop("description", None)
        return RunConfig.model_validate(recipe)

    serve, cpu_small = config("serve-vllm"), config("cpu-small")
    assert serve.search.attention == "whole" and 1536 % serve.prune.mlp_multiple == 0
    assert serve.search.model_copy(update={"attention": "heads"}) == cpu_small.search  # the same budget otherwise
    cfg = config("paper")
    assert cfg.search.exchange == "none" and cfg.prune.budget == "groups"
    with pytest.raises(ValueError, match="prune.budget=params"):
        RunConfig.model_validate({"calibration": {"files": ["-"]}, "search": {"exchange": "params"}})


def test_a_layout_with_partial_attention_is_refused_naming_the_setting_that_avoids_it(tiny_folder, windows, tmp_path):
    folder = tiny_folder("llama")
    _, subs, _ = _tiny_supernet(folder, windows, tmp_path)
    layout = SupernetReader(tmp_path).layout([0] * len(subs))  # two of four heads per attention
    with pytest.raises(ExportError, match="search.attention=whole"):
        nemotron_config(AutoConfig.from_pretrained(folder), layout)


def test_the_flows_plan_step_builds_the_search_space_the_config_names(tmp_path):
    """The plan task (what a `tyr prune` run builds its supernet from) honours search.attention and
    prune.mlp_multiple, as the core path does."""
    from flows.recipes import resolve_config
    from tasks.supernet import plan
    from tyr_core.grid import IterationPlan
    from tyr_runtime.runs import open_run, release_run

    overrides = ["search.attention=whole", "prune.mlp_multiple=32"]
    ref = open_run(resolve_config("tiny-test", overrides=overrides), "space", f"file://{tmp_path}", None)
    release_run(ref)
    grid = IterationPlan.from_json(plan.fn(ref, 1))
    for sub in grid.sublayers:
        removed = {sub.removed(level) for level in sub.levels}
        if sub.kind == "attn":
            assert removed <= {0, sub.groups}, (sub.name, removed)
        else:
            assert all(r % 32 == 0 for r in removed), (sub.name, removed)


def test_a_search_scored_with_the_hidden_state_term_runs_on_the_teachers_dense_states(tiny_folder, windows, tmp_path):
    folder = tiny_folder("llama")
    cfg = RunConfig.model_validate(
        {
            "calibration": {"files": ["-"], "seq_len": 32, "num_windows": 16, "validation_windows": 0},
            "prune": {"iterations": 1, "num_levels": 5, "interval": 0.25, "mlp_rounds": 2},
            "search": {"generations": 2, "offspring": 4, "stage_tokens": [32, 64], "survivors": [2, 1]},
            "device": "cpu",
        }
    )
    hidden = cfg.model_copy(update={"search": cfg.search.model_copy(update={"hidden_weight": 1.0})})
    geo = LayerwiseModel(folder).geometry
    layers = hidden.search.hidden_layer_ids(geo.num_layers)
    dense = AutoModelForCausalLM.from_pretrained(folder).eval()
    logits, captured = teacher_forward(dense, placement(hidden), layers)
    write_teacher_topk(logits, windows[:8], 32, tmp_path / "teacher", 8, captured=captured, hidden_layers=layers)
    teacher = TeacherTopK(tmp_path / "teacher")
    centres = initial_centres(geo, cfg.prune, "heads")
    scores = {}
    for name, run_cfg in (("kl", cfg), ("hidden", hidden)):
        res = run_iteration_local(folder, windows[:16], teacher, run_cfg, 1, centres, tmp_path / name)
        scores[name] = res.validation_fitness
    # the same supernet and seed: the hidden term can only add to the winner's KL, or pick another winner
    assert scores["hidden"] > 0 and scores["hidden"] != scores["kl"]
