"""Presets: YAML run configurations in ``deployments/presets/``, resolved with flat and dotted overrides."""

from __future__ import annotations

from pathlib import Path

from tyr_core.config import RunConfig, load_run_config, load_yaml
from tyr_core.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parents[1] / "deployments" / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name_or_path: str) -> Path:
    """A preset name (``smollm2-50``) or a path to a YAML config."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())}, or a .yaml path")
    return candidate


def resolve_config(
    preset: str,
    target_sparsity: float | None = None,
    iterations: int | None = None,
    generations: int | None = None,
    offspring: int | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """The validated run config: preset, then the flat flow parameters, then ``section.field=value`` overrides."""
    flat = {
        "prune.target_sparsity": target_sparsity,
        "prune.iterations": iterations,
        "search.generations": generations,
        "search.offspring": offspring,
    }
    sets = [f"{k}={v}" for k, v in flat.items() if v is not None] + list(overrides or [])
    path = preset_path(preset)
    return load_run_config(load_yaml(path), sets, origin=str(path.name))
