"""The ``tyr`` command: one parser, one handler per command, and the exit codes."""

from __future__ import annotations

import argparse
import os
import signal

from tyr_core.errors import TyrError

from . import demo, evaluate, export, prune, recipes, runs, store
from .common import EPILOG, InvalidInput, err_console, report_error, signals_as_interrupt

# Each command's module adds its parser (its flags, help and handler); the order is the order of ``tyr --help``.
COMMANDS = (prune, runs, evaluate, export, store, demo, recipes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tyr",
        description="Týr-the-Pruner: structural pruning of Llama-family LLMs, as Prefect flows with S3 checkpoints.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="print tracebacks with errors")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``tyr ARGV``; returns the exit code (0 success, 1 failed, 2 refused before anything ran, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    # Offline hosts, and nobody asked to report usage: no server analytics, no client telemetry (nor its notice).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # The temporary local Prefect server gets 20 s to start by default; a loaded 2-core host can need more.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        with signals_as_interrupt(signal.SIGTERM):
            return args.handler(args)
    except InvalidInput as err:
        report_error(err.__cause__ or err, args.debug)
        return 2
    except TyrError as err:
        report_error(err, args.debug)
        return 1
    except KeyboardInterrupt:
        err_console.print("interrupted: committed work is kept; the same command resumes it")
        return 130
    except Exception as err:  # a bug or the environment (out of memory, a dependency): still one line
        report_error(err, args.debug, prefix=f"failed ({type(err).__name__}; --debug shows the traceback)")
        return 1
