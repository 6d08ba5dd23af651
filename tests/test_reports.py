"""The markdown of the Prefect artifacts people read in the UI (the flow test checks they are published)."""

from __future__ import annotations

import base64

from tasks.reports import artifact_key, iteration_markdown, summary_markdown


def test_artifact_keys_are_what_prefect_accepts():
    assert artifact_key("SmolLM2_135M.v2", "iteration-1") == "tyr-smollm2-135m-v2-iteration-1"


def test_iteration_table_has_every_layer_in_order_and_the_fitness_per_generation():
    result = {
        "iteration": 2,
        "fitness": 0.123456,
        "sparsities": {
            "model.layers.10.mlp": 0.25,
            "model.layers.2.self_attn": 0.75,
            "model.layers.2.mlp": 0.5,
            "model.layers.10.self_attn": 0.125,
        },
    }
    history = [{"generation": 1, "fitness": 0.2, "candidates": 16, "evaluations": 23}]
    md = iteration_markdown(result, history)
    assert "# Iteration 2" in md and "**0.12346**" in md
    assert md.index("| 2 | 75.0% | 50.0% |") < md.index("| 10 | 12.5% | 25.0% |")  # numeric, not string order
    assert "| 1 | 0.2 | 16 | 23 |" in md


def test_summary_shows_baselines_parameters_time_and_embeds_the_plot():
    report = {
        "iteration": 2,
        "tyr_ppl": 80.5,
        "tyr_params": {"total": 90_000_000, "removed": 40_000_000, "removed_fraction": 0.5},
        "baselines": {
            "dense_ppl": 41.9,
            "magnitude_ppl": 865073.0,
            "uniform_ppl": 138.7,
            "dense_params": {"total": 134_515_008},
            "uniform_params": {"total": 94_000_000},
        },
    }
    md = summary_markdown(report, 600.0, plot_png=b"\x89PNG fake")
    assert "| dense | 41.90 | 134,515,008 |" in md and "| **tyr (searched)** | **80.50** | **90,000,000** |" in md
    assert "865,073.00" in md and "| Týr local pruner, uniform | 138.70 | 94,000,000 |" in md
    assert "Physically removed: 40,000,000 parameters, 50.0% of the decoder layers'" in md
    assert "33.1% of the model's (134,515,008 -> 90,000,000" in md and "Wall time of this flow run: 10 min 00 s." in md
    assert base64.b64encode(b"\x89PNG fake").decode() in md


def test_summary_states_the_iterations_run_the_chosen_one_and_why_the_target_and_the_wall_time():
    report = {
        "iteration": 1,
        "tyr_ppl": 80.5,
        "tyr_params": {"total": 90_000_000, "removed": 40_000_000, "removed_fraction": 0.443},
        "baselines": {"dense_params": {"total": 134_515_008}, "uniform_params": {"total": 94_000_000}},
    }
    iterations = [
        {"iteration": 1, "fitness": 0.31, "validation_fitness": 0.402},
        {"iteration": 2, "fitness": 0.27, "validation_fitness": 0.415},  # lower search KL, but not the final model
    ]
    md = summary_markdown(report, 110.0, iterations=iterations, target_sparsity=0.5, budget="groups")
    assert "Iterations run: 2. Final model: iteration 1, the lowest validation KL" in md
    assert "Iterations: 1" not in md
    assert "| **1** | **0.31** | **0.402** |" in md and "| 2 | 0.27 | 0.415 |" in md
    assert "Target: 50.0% of attention heads and MLP neurons. Physically removed: 40,000,000 parameters, 44.3%" in md
    assert "Wall time of this flow run: 1 min 50 s." in md
    by_params = summary_markdown(report, 5.0, iterations=iterations[:1], target_sparsity=0.3, budget="params")
    assert "Target: 30.0% of the decoder's parameters." in by_params and "Iterations run: 1." in by_params


def test_an_iteration_without_generations_has_no_fitness_to_show():
    result = {"iteration": 1, "fitness": None, "sparsities": {"model.layers.0.mlp": 0.5}}
    assert "not scored" in iteration_markdown(result, [])
