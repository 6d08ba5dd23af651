"""``tyr config keys``: every setting ``--set`` accepts, with its type, default and meaning, read from the pydantic
models of the run configuration; and the "did you mean" of an unknown ``--set`` key."""

from __future__ import annotations

import argparse
import difflib
import types
import typing
from typing import Any

from .common import add_command, out_console, print_json, refusing


def _section_models() -> dict[str, type]:
    """The sections of a run config that are models of their own (``search`` is typed where it is validated)."""
    from pydantic import BaseModel

    from tyr_core.config import RunConfig
    from tyr_core.search import SearchConfig

    sections: dict[str, type] = {"search": SearchConfig}
    for name, info in RunConfig.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            sections[name] = info.annotation
    return sections


def type_name(annotation: Any) -> str:
    """``int | None`` -> ``int or null``; ``Literal['a', 'b']`` -> ``a|b``; ``list[str]`` -> ``list[str]``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "|".join(str(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list[{', '.join(type_name(a) for a in typing.get_args(annotation))}]"
    return getattr(annotation, "__name__", str(annotation))


def setting_keys(recipe: str | None = None) -> list[dict[str, Any]]:
    """One row per ``--set`` key: ``key``, ``type``, ``default`` (the recipe's value where a recipe is named) and
    ``meaning`` (the field's description)."""
    from pydantic_core import PydanticUndefined

    from tyr_core.config import RunConfig

    values = _recipe_values(recipe) if recipe else {}
    sections = _section_models()
    rows = []
    for name, info in RunConfig.model_fields.items():
        models = [(f"{name}.", sections[name])] if name in sections else [("", None)]
        for prefix, model in models:
            fields = model.model_fields.items() if model else [(name, info)]
            for field, finfo in fields:
                key = prefix + field
                if key in values:
                    default = values[key]
                elif finfo.default_factory is not None:
                    default = finfo.default_factory()
                else:
                    default = None if finfo.default is PydanticUndefined else finfo.default
                rows.append(
                    {
                        "key": key,
                        "type": type_name(finfo.annotation),
                        "default": default,
                        "required": finfo.is_required() and key not in values,
                        "meaning": finfo.description or "",
                    }
                )
    return rows


def _recipe_values(recipe: str) -> dict[str, Any]:
    """The recipe's resolved settings, flattened to ``section.field`` keys."""
    from flows.recipes import load_recipe
    from tyr_core.config import load_run_config

    data = {k: v for k, v in load_recipe(recipe).items() if k != "description"}
    data["model"] = {**(data.get("model") or {}), "source": "MODEL"}
    config = load_run_config(data, origin=f"recipe {recipe}").model_dump(mode="json")
    flat = {}
    for name, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{field}": v for field, v in value.items()})
        else:
            flat[name] = value
    return flat


def known_keys() -> set[str]:
    """Every key ``--set`` accepts, sections included (``--set search={...}`` sets a whole one)."""
    return {row["key"] for row in setting_keys()} | set(_section_models())


def nearest_keys(key: str, n: int = 3) -> list[str]:
    """The known keys closest to ``key``: by the whole key, then by its last part (``offspring`` ->
    ``search.offspring``)."""
    keys = sorted(known_keys())
    close = difflib.get_close_matches(key, keys, n=n, cutoff=0.6)
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    for match in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.7):
        if by_leaf[match] not in close:
            close.append(by_leaf[match])
    return close[:n]


def check_setting_keys(overrides: list[str]) -> None:
    """Refuse a ``--set`` key that no setting has, naming the nearest ones (``ConfigError``)."""
    from tyr_core.errors import ConfigError

    known = None
    for item in overrides:
        if "=" not in item:
            continue  # the config's own parser names the missing '='
        key = item.split("=", 1)[0].strip()
        known = known or known_keys()
        if key in known:
            continue
        near = nearest_keys(key)
        hint = f"did you mean {' or '.join(near)}? " if near else ""
        raise ConfigError(f"unknown setting {key!r} (--set {item}): {hint}tyr config keys lists every setting")


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def cmd_config_keys(args: argparse.Namespace) -> int:
    with refusing():
        rows = setting_keys(args.recipe)
    if args.json:
        print_json(rows)
        return 0
    source = f"recipe {args.recipe}" if args.recipe else "the defaults, before a recipe"
    out_console.print(f"--set KEY=VALUE settings; defaults: {source}", highlight=False)
    for row in rows:
        default = "required" if row["required"] else _fmt(row["default"])
        out_console.print(f"[bold]{row['key']}[/bold] ({row['type']}, default {default})", highlight=False)
        if row["meaning"]:
            out_console.print(f"    {row['meaning']}", highlight=False)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="the settings a run takes (tyr config keys)", description="The run settings.")
    commands = p.add_subparsers(title="commands", metavar="{keys}", required=True)
    keys = add_command(
        commands,
        "keys",
        cmd_config_keys,
        "every --set KEY=VALUE setting: its type, default and meaning",
        "Every setting --set KEY=VALUE accepts, with its type, its default (a recipe's own with --recipe) and "
        "what it means.",
    )
    keys.add_argument("--recipe", metavar="NAME", help="show this recipe's values as the defaults (tyr recipes)")
    keys.add_argument("--json", action="store_true", help="one JSON document on stdout")
