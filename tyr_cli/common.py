"""Shared by every command: the two consoles, one-line errors with credentials redacted, formatters, common flags."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape

from tyr_core.errors import TyrError
from tyr_core.redaction import redact, without_userinfo  # noqa: F401 - the CLI's one redaction

err_console = Console(stderr=True, soft_wrap=True)  # progress, notes and errors: never wrapped mid-line

out_console = Console(soft_wrap=True)  # tables and results for people


# When this command started (``main`` sets it): the wall time a person waited, server starts and checks included.
command_started = time.perf_counter()


class InvalidInput(Exception):
    """Refused before anything ran (exit 2); the message comes from the ``TyrError`` that said why."""


@contextlib.contextmanager
def refusing() -> Iterator[None]:
    """Inside this block a ``TyrError`` is invalid input (exit 2), not a failed run (exit 1)."""
    try:
        yield
    except TyrError as err:
        raise InvalidInput(str(err)) from err


def one_line(message: str) -> str:
    """A multi-line message (pydantic's list of fields) as one line; long details stay on lines of their own."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if len(lines) > 6:  # e.g. a server's log tail: keep it readable below the headline
        return lines[0] + "\n  " + "\n  ".join(lines[1:])
    if len(lines) > 1 and lines[0].endswith(":"):
        return lines[0] + " " + "; ".join(lines[1:])
    return "; ".join(lines)


def report_error(err: BaseException, debug: bool, prefix: str = "error") -> None:
    if debug:
        err_console.print(escape(redact("".join(traceback.format_exception(err)))), highlight=False)
    err_console.print(f"[red]{prefix}:[/red] {escape(redact(one_line(str(err))))}", highlight=False)


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for the duration of the block."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            _set_env(name, value)
        yield
    finally:
        for name, value in saved.items():
            _set_env(name, value)


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")
    sys.stdout.flush()


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{n} B"


def fmt_ppl(value: Any) -> str:
    return f"{value:,.2f}" if isinstance(value, int | float) else "-"


def fmt_params(params: dict | None) -> str:
    return f"{params['total']:,}" if params and "total" in params else "-"


def fmt_removed(params: dict | None) -> str:
    return f"{params['removed_fraction']:.1%}" if params and "removed_fraction" in params else "-"


@contextlib.contextmanager
def signals_as_interrupt(*signals: signal.Signals) -> Iterator[None]:
    """These signals raise KeyboardInterrupt, so ``kill PID`` unwinds like Ctrl-C: the embedded SeaweedFS is stopped
    and the run's lock released, instead of a server left running on the data folder."""

    def interrupt(_signum: int, _frame: FrameType | None) -> NoReturn:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {sig: signal.signal(sig, interrupt) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


EPILOG = """\
exit codes: 0 done; 1 the run (export, eval) failed, or another process holds the run; 2 refused before anything \
ran (arguments, model, recipe, config key or value, store URL or store, run id reused with another config); \
130 interrupted (committed work is kept: the same command resumes).
store: --store, else $TYR_STORE_URL (file:///PATH or s3://BUCKET/PREFIX, with --endpoint-url or \
$TYR_S3_ENDPOINT_URL for non-AWS S3; credentials from the AWS chain), else the embedded SeaweedFS, started for the \
duration of the command (data in ~/.cache/tyr/seaweedfs, or $TYR_CACHE/seaweedfs).
Each command's --help lists its options; tyr config keys lists every --set setting."""


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog on its own to the terminal's width: line breaks are kept (the
    epilog's paragraphs) and no line runs past the width, as RawDescriptionHelpFormatter's would."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return "\n".join(
            textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent + "  ") if line else ""
            for line in text.splitlines()
        )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def sparsity_fraction(text: str) -> float:
    """``--sparsity``: a fraction strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a fraction such as 0.5, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), e.g. 0.5, got {value}")
    return value


def store_flags(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a flag given before a sub-subcommand (tyr runs --store X show ID) is not reset by the default
    parser.add_argument("--store", metavar="URL", default=argparse.SUPPRESS, help="file:///PATH or s3://BUCKET/PREFIX")
    parser.add_argument("--endpoint-url", metavar="URL", default=argparse.SUPPRESS, help="S3 endpoint (non-AWS)")


def json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON document on stdout")


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    handler: Callable[[argparse.Namespace], int],
    help_: str,
    description: str = "",
) -> argparse.ArgumentParser:
    # The shared epilog is on ``tyr --help`` only: repeated under every command it buried their own options.
    parser = sub.add_parser(name, help=help_, description=description or help_, formatter_class=HelpFormatter)
    parser.set_defaults(handler=handler)
    return parser
