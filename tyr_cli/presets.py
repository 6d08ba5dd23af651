"""``tyr presets``: the presets and what each costs."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from .common import add_command, out_console, print_json


def preset_comment(path: Path) -> list[str]:
    """The leading comment lines of a preset (what it is and what it costs)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def cmd_presets(args: argparse.Namespace) -> int:
    from flows.presets import preset_names, preset_path

    rows = [{"name": n, "description": (preset_comment(preset_path(n)) or [""])[0]} for n in preset_names()]
    if args.json:
        print_json(rows)
        return 0
    table = Table(title="presets (tyr prune PRESET)", show_lines=False)
    table.add_column("preset", no_wrap=True)
    table.add_column("what it is")
    for row in rows:
        table.add_row(row["name"], row["description"])
    out_console.print(table)
    return 0


def add_parser(sub) -> None:
    add_command(sub, "presets", cmd_presets, "list the presets and what each costs").add_argument(
        "--json", action="store_true"
    )
