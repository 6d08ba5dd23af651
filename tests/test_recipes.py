"""Recipes, shorthands and model aliases resolve to the same run configs (hence artefact hashes and run ids) as the
presets they replaced; config files still work; mistakes are refused with the flag to fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.recipes import MODEL_ALIASES, SHORTHANDS, load_recipe, recipe_names, resolve_config
from tyr_core.config import load_run_config
from tyr_core.errors import ConfigError
from tyr_runtime.runs import default_run_id

REPO = Path(__file__).resolve().parents[1]
LEGACY = yaml.safe_load((Path(__file__).parent / "data" / "presets-0.1.0.yaml").read_text())
PAPER_PRESETS = sorted(name for name in LEGACY if name not in SHORTHANDS)
HUB_TO_ALIAS = {hub: alias for alias, hub in MODEL_ALIASES.items()}


def legacy(name: str):
    """A 0.1.0 preset, loaded as ``tyr prune PRESET`` loaded it. The paper's recipe keeps the saliency those presets
    had (first-order term weight 1); the CPU recipes take the measured default."""
    pinned = ["prune.first_order=1"] if name in PAPER_PRESETS else []
    return load_run_config(LEGACY[name], pinned, origin=f"{name}.yaml")


@pytest.mark.parametrize("name", sorted(SHORTHANDS))
def test_each_shorthand_resolves_to_its_former_preset(name):
    config, before = resolve_config(name), legacy(name)
    assert config == before
    assert config.artefact_hash() == before.artefact_hash() and default_run_id(config) == default_run_id(before)


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_a_model_with_the_paper_recipe_resolves_to_its_former_preset(name):
    source, sparsity = LEGACY[name]["model"]["source"], LEGACY[name]["prune"]["target_sparsity"]
    by_alias = resolve_config(HUB_TO_ALIAS[source], sparsity)  # the paper's recipe is the default for hub models
    by_hub_name = resolve_config(model=source, recipe="paper", target_sparsity=sparsity)
    assert by_alias == by_hub_name == legacy(name)


def test_the_deployments_resolve_to_their_former_presets():
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    former = {"llama70b": "llama-3.1-70b-50", "llama8b": "llama-3.1-8b-50"}
    former |= {"smollm2-demo": "smollm2-demo", "tiny-test": "tiny-test"}
    for deployment in spec["deployments"]:
        config, before = resolve_config(**deployment["parameters"]), legacy(former[deployment["name"]])
        assert config.artefact_hash() == before.artefact_hash()
        assert config.model_dump(exclude={"execution"}) == before.model_dump(exclude={"execution"})  # how, not what


def test_recipes_hold_the_method_only():
    assert recipe_names() == ["cpu-small", "demo", "paper", "serve-vllm", "tiny-test"]
    for name in recipe_names():
        recipe = load_recipe(name)
        assert recipe["description"] and "source" not in recipe.get("model", {})
        assert "target_sparsity" not in recipe.get("prune", {})


def test_a_recipe_that_names_a_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("flows.recipes.RECIPE_DIR", tmp_path)
    (tmp_path / "bad.yaml").write_text("model: {source: x/y}\ncalibration: {files: [a.txt]}\n")
    with pytest.raises(ConfigError, match="sets model.source: a recipe holds the method's settings only"):
        load_recipe("bad")


def test_flags_and_overrides_apply_over_the_shorthand_in_order():
    config = resolve_config("smollm2-50", 0.25, generations=3, overrides=["search.generations=5"])
    assert config.prune.target_sparsity == 0.25 and config.search.generations == 5
    assert resolve_config("smollm2-50", 0.25) == legacy("smollm2-25")
    assert resolve_config("smollm2-135m", 0.5, recipe="demo") == legacy("smollm2-demo")
    assert resolve_config() == legacy("smollm2-50")  # the flow's run when it is given nothing


def test_a_config_file_still_works_and_takes_no_recipe(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(LEGACY["smollm2-50"]))
    assert resolve_config(str(path)) == legacy("smollm2-50")
    assert resolve_config(str(path), 0.25).prune.target_sparsity == 0.25
    with pytest.raises(ConfigError, match="--recipe does not apply to a config file"):
        resolve_config(str(path), recipe="paper")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"model": "smollm2-135m"}, "no target sparsity for smollm2-135m: give --sparsity"),
        ({"model": "smollm2-135m", "target_sparsity": 0.5, "recipe": "x"}, "unknown recipe 'x' (--recipe); recipes: "),
        ({"model": "no-such-model", "target_sparsity": 0.5}, "unknown model or shorthand 'no-such-model'"),
        ({"model": "smollm2-135m", "preset": "smollm2-50"}, "not both"),
    ],
)
def test_mistakes_name_what_to_do(kwargs, message):
    with pytest.raises(ConfigError) as err:
        resolve_config(**kwargs)
    assert message in str(err.value)
