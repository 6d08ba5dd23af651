"""``tyr --help`` and every command's help: one line of help per argument, the shared epilog once (on ``tyr
--help``), what to run first, and every line within an 80-column terminal."""

from __future__ import annotations

import argparse

import pytest

from tyr_cli import main
from tyr_cli.main import build_parser, subcommands

COMMANDS = [(), *(path for path, _ in subcommands(build_parser()))]
OWNED_ELSEWHERE = {("export",): "tyr_cli/export.py gives its arguments their help"}


def _ids(path: tuple[str, ...]) -> str:
    return " ".join(path) or "tyr"


def help_text(path: tuple[str, ...], capsys, monkeypatch, columns: int = 80) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))  # argparse sizes its help to the terminal's width
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_every_command_is_covered():
    assert {("prune",), ("runs", "show"), ("export",), ("store", "serve"), ("config", "keys")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=_ids)
def test_every_help_line_fits_80_columns(path, capsys, monkeypatch):
    text = help_text(path, capsys, monkeypatch)
    assert text.startswith(f"usage: tyr {' '.join(path)}".rstrip())
    wide = [line for line in text.splitlines() if len(line) > 80]
    owner = f" ({OWNED_ELSEWHERE[path]})" if path in OWNED_ELSEWHERE else ""
    assert not wide, f"tyr {' '.join(path)} --help has {len(wide)} lines over 80 columns{owner}: {wide}"


@pytest.mark.parametrize("path", COMMANDS, ids=_ids)
def test_every_argument_has_a_one_line_help(path):
    parser = build_parser()
    parsers = dict(subcommands(parser))
    target = parsers[path] if path else parser
    missing = [
        action.option_strings[0] if action.option_strings else action.dest
        for action in target._actions
        if not isinstance(action, argparse._SubParsersAction) and not action.help
    ]
    owner = f" ({OWNED_ELSEWHERE[path]})" if path in OWNED_ELSEWHERE else ""
    assert not missing, f"tyr {' '.join(path)}: arguments without help{owner}: {missing}"
    for action in target._actions:
        assert "\n" not in (action.help or ""), action.dest


def test_the_epilog_is_on_tyr_help_only_and_it_says_what_to_run_first(capsys, monkeypatch):
    top = help_text((), capsys, monkeypatch)
    assert top.count("exit codes:") == 1 and "store: --store" in top
    assert "First run: tyr demo" in top and "tyr prune tiny-test" in top
    for path in COMMANDS[1:]:
        assert "exit codes:" not in help_text(path, capsys, monkeypatch), path


def test_help_wraps_to_a_narrower_terminal(capsys, monkeypatch):
    text = help_text(("prune",), capsys, monkeypatch, columns=60)
    assert max(map(len, text.splitlines())) <= 60


def test_the_model_names_that_recipes_repeat_agree_with_the_families_module():
    import flows.recipes
    import tyr_core.families

    assert (flows.recipes.SMOLLM2, flows.recipes.TINY_RANDOM) == (
        tyr_core.families.SMOLLM2,
        tyr_core.families.TINY_RANDOM,
    )
