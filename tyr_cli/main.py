"""The ``tyr`` command: one parser, one handler per command, and the exit codes."""

from __future__ import annotations

import argparse
import os
import signal
import time
from collections.abc import Iterator

from tyr_core.errors import ConfigError, TyrError

from . import common, config, demo, evaluate, export, prune, recipes, runs, store
from .common import EPILOG, HelpFormatter, InvalidInput, err_console, report_error, signals_as_interrupt

# Each command's module adds its parser (its flags, help and handler); the order is the order of ``tyr --help``.
COMMANDS = (prune, runs, evaluate, export, store, demo, recipes, config)

DESCRIPTION = """\
Týr-the-Pruner: structural pruning of Llama-family LLMs, as Prefect flows with S3 checkpoints.
First run: tyr demo (SmolLM2-135M to 50% on the CPU, about 20 min on 2 cores), or tyr prune tiny-test \
(a tiny random model, about a minute) to check the installation; tyr recipes lists the recipes and shorthands."""

INTERRUPTED = "interrupted: committed work is kept; the same command resumes it"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tyr", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print tracebacks with errors")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    for _, child in subcommands(parser):
        # One epilog, on ``tyr --help``; every command's help wrapped to the terminal, whoever built its parser.
        child.epilog = None
        child.formatter_class = HelpFormatter
    return parser


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (command path, parser) under ``parser``, depth first: ``(("runs",), ...), (("runs", "show"), ...)``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from subcommands(child, (*path, name))


def check_arguments(args: argparse.Namespace) -> None:
    """What needs no store, model or server is checked before any of them starts: a run id first."""
    from tyr_runtime.storage import check_run_id

    for name in ("run_id", "run"):
        value = getattr(args, name, None)
        if isinstance(value, str):
            check_run_id(value)


def main(argv: list[str] | None = None) -> int:
    """Run ``tyr ARGV``; returns the exit code (0 success, 1 failed, 2 refused before anything ran, 130 interrupted)."""
    common.command_started = time.perf_counter()
    args = build_parser().parse_args(argv)
    # Offline hosts, and nobody asked to report usage: no server analytics, no client telemetry (nor its notice).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    try:
        with signals_as_interrupt(signal.SIGTERM):
            try:
                check_arguments(args)
            except ConfigError as err:
                raise InvalidInput(str(err)) from err
            return args.handler(args)
    except InvalidInput as err:
        report_error(err.__cause__ or err, args.debug)
        return 2
    except TyrError as err:
        report_error(err, args.debug)
        return 1
    except KeyboardInterrupt as err:  # a run's own message names it
        err_console.print(str(err) or INTERRUPTED, highlight=False)
        return 130
    except Exception as err:  # a bug or the environment (out of memory, a dependency): still one line
        report_error(err, args.debug, prefix=f"failed ({type(err).__name__}; --debug shows the traceback)")
        return 1
