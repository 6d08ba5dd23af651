"""Recipes: the method's settings (calibration, supernet, search, teacher, evaluation and export budgets) in YAML
files under ``deployments/recipes/``, without the model or the target sparsity. A run is a model + a recipe + a
sparsity, then flat and dotted overrides; a config file holds a whole run instead. Shorthands name a model +
recipe + sparsity; model aliases name hub models.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tyr_core.config import RunConfig, load_run_config, load_yaml
from tyr_core.errors import ConfigError
from tyr_runtime.safety import refuse_caller_parameters

# tyr_core.families' names of the two models that come with tyr: importing it would load torch, which `tyr recipes`
# and `tyr config keys` do not need (tests/test_cli_help.py checks that the names agree).
SMOLLM2, TINY_RANDOM = "smollm2-135m", "tiny-random-llama"

RECIPE_DIR = Path(__file__).resolve().parents[1] / "deployments" / "recipes"
DEFAULT_RECIPE = "paper"


@dataclass(frozen=True)
class Shorthand:
    """A name for a model + recipe + sparsity: ``tyr prune smollm2-50``."""

    model: str
    recipe: str
    sparsity: float


SHORTHANDS = {
    "tiny-test": Shorthand(TINY_RANDOM, "tiny-test", 0.5),
    "smollm2-demo": Shorthand(SMOLLM2, "demo", 0.5),
    "smollm2-25": Shorthand(SMOLLM2, "cpu-small", 0.25),
    "smollm2-50": Shorthand(SMOLLM2, "cpu-small", 0.5),
}
DEFAULT_SHORTHAND = "smollm2-50"  # the flow's run when it is given neither a model nor a shorthand

# Short names of the hub models the paper prunes; the config keeps the hub name.
MODEL_ALIASES = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
}
# The recipe a model gets when none is named: the CPU ones for the models that come with tyr, else the paper's.
DEFAULT_RECIPES = {TINY_RANDOM: "tiny-test", SMOLLM2: "cpu-small"}


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    """A recipe's settings (its ``description`` included), checked to hold neither a model nor a sparsity."""
    path = RECIPE_DIR / f"{name}.yaml"
    if name not in recipe_names() or not path.is_file():  # a name, never a path to another YAML file
        raise ConfigError(
            f"unknown recipe {name!r} (--recipe); recipes: {', '.join(recipe_names())} (tyr recipes shows each)"
        )
    data = load_yaml(path)
    for section, field in (("model", "source"), ("prune", "target_sparsity")):
        if field in (data.get(section) or {}):
            raise ConfigError(f"recipe {path} sets {section}.{field}: a recipe holds the method's settings only")
    return data


def is_config_file(target: str) -> bool:
    return Path(target).suffix in (".yaml", ".yml")


def model_source(model: str) -> str:
    """The config's ``model.source`` for a model argument: an alias becomes its hub name, anything else stays."""
    return MODEL_ALIASES.get(model, model)


def resolve_config(
    preset: str | None = None,
    target_sparsity: float | None = None,
    iterations: int | None = None,
    generations: int | None = None,
    offspring: int | None = None,
    overrides: list[str] | None = None,
    *,
    model: str | None = None,
    recipe: str | None = None,
) -> RunConfig:
    """The validated run config.

    ``preset`` is a shorthand, a config file or a model (``model`` names a model only); the base is the config file,
    or the model with ``recipe`` (default: the shorthand's, the model's, or the paper's) and the target sparsity.
    Then the flat flow parameters, then ``section.field=value`` overrides.

    Raises:
        ConfigError: an unknown recipe, a missing sparsity, a recipe given with a config file, an invalid value.
    """
    refuse_caller_parameters(model=model, preset=preset, overrides=overrides)  # a deployment's caller: method only
    if preset and model:
        raise ConfigError(f"give a model ({model!r}) or a shorthand or config file ({preset!r}), not both")
    target = preset or model or DEFAULT_SHORTHAND
    flat = {
        "prune.target_sparsity": target_sparsity,
        "prune.iterations": iterations,
        "search.generations": generations,
        "search.offspring": offspring,
    }
    sets = [f"{k}={v}" for k, v in flat.items() if v is not None] + list(overrides or [])
    if is_config_file(target):
        if recipe:
            raise ConfigError(
                f"--recipe does not apply to a config file ({target} holds its own settings); change them with --set"
            )
        path = Path(target).expanduser()
        return load_run_config(load_yaml(path), sets, origin=path.name)
    base, origin = _model_and_recipe(target, recipe, target_sparsity)
    return load_run_config(base, sets, origin=origin)


def is_shorthand(target: str) -> bool:
    return target in SHORTHANDS


def check_model_name(model: str) -> None:
    """Refuse, without touching the disk or the hub, a model argument that cannot name a model."""
    if model in MODEL_ALIASES or model in (SMOLLM2, TINY_RANDOM) or model.endswith(".gguf"):
        return
    if Path(model).expanduser().exists() or (model.count("/") == 1 and not model.startswith((".", "/", "~"))):
        return
    raise ConfigError(
        f"unknown model or shorthand {model!r}: give a hub name 'org/name', a local folder, a .gguf file, a model "
        f"alias ({', '.join([SMOLLM2, TINY_RANDOM, *MODEL_ALIASES])}) or a shorthand ({', '.join(SHORTHANDS)})"
    )


def _model_and_recipe(target: str, recipe: str | None, sparsity: float | None) -> tuple[dict[str, Any], str]:
    short = SHORTHANDS.get(target)
    if short is None:
        check_model_name(target)
    model = short.model if short else target
    name = recipe or (short.recipe if short else DEFAULT_RECIPES.get(model, DEFAULT_RECIPE))
    sparsity = sparsity if sparsity is not None else (short.sparsity if short else None)
    if sparsity is None:
        raise ConfigError(
            f"no target sparsity for {model}: give --sparsity (the flow's target_sparsity), e.g. 0.5 to remove half "
            "of the attention heads and MLP neurons"
        )
    data = copy.deepcopy(load_recipe(name))
    data.pop("description", None)
    data["model"] = {**(data.get("model") or {}), "source": model_source(model)}
    data["prune"] = {**(data.get("prune") or {}), "target_sparsity": sparsity}
    return data, f"config ({model} with recipe {name})"


def recipe_cost(name: str) -> dict[str, Any]:
    """What a recipe spends, from its settings alone: search evaluations, calibration tokens, teacher windows."""
    data = load_recipe(name)
    cfg = load_run_config(
        {k: v for k, v in data.items() if k != "description"} | {"model": {**data.get("model", {}), "source": "_"}},
        origin=f"recipe {name}",
    )
    cal, search = cfg.calibration, cfg.search
    return {
        "name": name,
        "description": data.get("description", ""),
        "iterations": cfg.prune.iterations,
        "generations": search.generations,
        "offspring": search.offspring,
        "offspring_evaluations": cfg.prune.iterations * search.generations * search.offspring,
        "supernet_levels": cfg.prune.num_levels,
        "stage_tokens": list(search.stage_tokens),
        "calibration_tokens": cal.num_windows * cal.seq_len,
        "calibration_source": cal.dataset or ", ".join(cal.files),
        "teacher_windows": cfg.teacher.max_windows,
        "teacher_topk": cfg.teacher.topk,
        "dtype": cfg.model.dtype,
    }
