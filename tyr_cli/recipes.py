"""``tyr recipes``: each recipe and what it spends, from its settings; the shorthands and model aliases."""

from __future__ import annotations

import argparse

from rich import box
from rich.table import Table

from .common import add_command, out_console, print_json

BENCHMARKS = "docs/benchmarks.md"  # measured times and quality live there, not here


def recipe_rows() -> list[dict]:
    from flows.recipes import recipe_cost, recipe_names

    return [recipe_cost(name) for name in recipe_names()]


def _short_source(source: str) -> str:
    """``@shakespeare/calibration`` -> shakespeare, ``HuggingFaceFW/fineweb-edu`` -> fineweb-edu."""
    return source[1:].split("/")[0] if source.startswith("@") else source.rsplit("/", 1)[-1]


def cmd_recipes(args: argparse.Namespace) -> int:
    from flows.recipes import DEFAULT_RECIPE, DEFAULT_RECIPES, MODEL_ALIASES, SHORTHANDS

    rows = recipe_rows()
    if args.json:
        shorthands = {n: vars(s) for n, s in SHORTHANDS.items()}
        print_json({"recipes": rows, "shorthands": shorthands, "model_aliases": MODEL_ALIASES})
        return 0
    table = Table(title="recipes (tyr prune MODEL --sparsity S --recipe NAME)", box=box.SIMPLE_HEAD)
    for column in ("recipe", "search", "levels", "calibration", "teacher"):
        table.add_column(column, no_wrap=True)
    for r in rows:
        table.add_row(
            r["name"],
            f"{r['iterations']} x {r['generations']} x {r['offspring']}",
            str(r["supernet_levels"]),
            f"{r['calibration_tokens']:,} {_short_source(r['calibration_source'])}",
            f"top-{r['teacher_topk']} x {r['teacher_windows'] or 'all'}",
        )
    out_console.print(table)
    out_console.print(
        "search: iterations x generations x offspring; levels: copies per sublayer; calibration: tokens and text; "
        "teacher: top-k logits x windows kept",
        highlight=False,
    )
    for r in rows:
        out_console.print(f"  {r['name']} ({r['dtype']}): {r['description']}", highlight=False)
    defaults = ", ".join(f"{m}: {r}" for m, r in DEFAULT_RECIPES.items())
    out_console.print(f"default recipe: {defaults}; any other model: {DEFAULT_RECIPE}", highlight=False)
    shorthands = Table(title="shorthands (tyr prune NAME)")
    for column in ("shorthand", "model", "recipe", "sparsity"):
        shorthands.add_column(column)
    for name, short in SHORTHANDS.items():
        shorthands.add_row(name, short.model, short.recipe, f"{short.sparsity:g}")
    out_console.print(shorthands)
    out_console.print(f"model aliases: {', '.join(f'{a} = {m}' for a, m in MODEL_ALIASES.items())}", highlight=False)
    out_console.print(f"measured wall times and quality: {BENCHMARKS}", highlight=False)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    helps = {
        "recipes": "list the recipes, what each costs, and the shorthands",
        "presets": "another name for recipes (the presets it replaced are shorthands now)",
    }
    for name, help_ in helps.items():
        add_command(sub, name, cmd_recipes, help_).add_argument(
            "--json", action="store_true", help="one JSON document on stdout"
        )
