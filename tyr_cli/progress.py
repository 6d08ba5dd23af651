"""Progress bars read from the store's manifests while the flow runs, and quiet library loggers."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from tyr_core.errors import TyrError

from .common import err_console

if TYPE_CHECKING:
    from rich.progress import Progress

    from tyr_core.config import RunConfig
    from tyr_core.store import Store

POLL_SECONDS = 2.0


class ProgressPoller(threading.Thread):
    """Drives rich progress bars from the store while the flow runs; cosmetic, so it never breaks the run."""

    def __init__(self, store: Store, config: RunConfig, progress: Progress, live: bool):
        super().__init__(daemon=True, name="tyr-progress")
        self.store, self.config, self.progress, self.live = store, config, progress, live
        self.halt = threading.Event()
        self.bars: dict[str, Any] = {}
        self.finished: set[str] = set()
        self.plans: dict[int, dict] = {}

    def poll(self) -> None:
        from tyr_runtime.run_status import committed_phases

        phases = committed_phases(self.store, self.config, self.plans)
        current = next((p.id for p in phases if p.done < p.total), None)
        for phase in phases:
            if phase.id not in self.bars:  # the clock (elapsed, eta) starts when the phase does
                self.bars[phase.id] = self.progress.add_task(phase.label, total=max(phase.total, 1), start=False)
            bar = self.bars[phase.id]
            if phase.id == current or phase.done:
                self.progress.start_task(bar)
            self.progress.update(bar, description=phase.label, completed=phase.done)
            if not self.live and phase.done >= phase.total and phase.id not in self.finished:
                err_console.print(f"done: {phase.label}")  # a log file gets one line per finished phase
            if phase.done >= phase.total:
                self.finished.add(phase.id)

    def run(self) -> None:
        while not self.halt.wait(POLL_SECONDS):
            try:
                self.poll()
            except Exception as err:  # a store hiccup only delays the bars; the flow reports real failures
                logging.getLogger(__name__).debug("progress poll failed: %s", err)


@contextlib.contextmanager
def progress_bars(store: Store, config: RunConfig, enabled: bool) -> Iterator[None]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    live = err_console.is_terminal
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, disable=not (enabled and live)) as progress:
        poller = ProgressPoller(store, config, progress, live)
        if enabled:
            poller.start()
        try:
            yield
        finally:
            poller.halt.set()
        if enabled:
            poller.join(timeout=30)  # one poller at a time touches the bars
            with contextlib.suppress(Exception):
                poller.poll()  # the final state, once


@contextlib.contextmanager
def preparing() -> Iterator[Callable[[str], None]]:
    """An ``announce`` callback for what a first use prepares (a model's conversion, a download): each preparation
    is shown while it runs (a spinner on a terminal, a line in a log) and, once it has finished, a line says how long
    it took. From the first one to the block's end, the libraries' own progress bars are kept off the display."""
    from rich.live import Live
    from rich.spinner import Spinner

    current: list[tuple[str, float, Live | None]] = []  # the preparation that runs: (what, started, its spinner)
    silenced = contextlib.ExitStack()
    quiet: list[bool] = []

    def stop(done: bool) -> None:
        if current:
            what, started, spinner = current.pop()
            if spinner is not None:
                spinner.stop()
            if done:
                err_console.print(f"[dim]{what}: done in {time.perf_counter() - started:.0f} s[/dim]", highlight=False)

    def announce(what: str) -> None:
        if not quiet:
            quiet.append(True)
            quiet_libraries()
            # transformers' GGUF conversion draws its bar with tqdm directly, past transformers' own switch: Python's
            # stderr goes nowhere meanwhile, and this display writes to the real one
            err_console.file = sys.stderr
            silenced.callback(setattr, err_console, "file", None)
            silenced.enter_context(contextlib.redirect_stderr(io.StringIO()))
        stop(done=True)
        spinner = None
        if err_console.is_terminal:
            spinner = Live(Spinner("dots", what), console=err_console, transient=True, redirect_stderr=False)
            spinner.start()
        else:
            err_console.print(f"[dim]{what}[/dim]", highlight=False)
        current.append((what, time.perf_counter(), spinner))

    with silenced:
        try:
            yield announce
        except BaseException:
            stop(done=False)
            raise
        stop(done=True)


class _HideTyrTracebacks(logging.Filter):
    """tyr's own errors carry clear messages, which the CLI prints as one line: no traceback for them; nor Prefect's
    crash lines after Ctrl-C, which the CLI's one line about resuming replaces (the Prefect API still gets them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TyrError | KeyboardInterrupt):
            return False
        return "aborted by an interrupt signal" not in record.getMessage()


def quiet_console(verbose: bool) -> None:
    """Prefect's per-task INFO lines would bury the progress bars: keep warnings and errors on the console, for the
    rest of this process (the temporary Prefect server logs its shutdown at exit). The Prefect API still gets every
    log. ``--verbose`` keeps everything."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if not isinstance(handler, PrefectConsoleHandler):
            continue
        # Prefect configures logging once per process and binds its console to the stderr of that moment; a second
        # in-process ``main()`` (a notebook, a test) may have another stderr, and the old one may be closed.
        if handler.stream is not sys.stderr:
            handler.stream = handler.console.file = sys.stderr  # not setStream(): it flushes the old, closed one
        if verbose:
            continue
        handler.setLevel(max(handler.level, logging.WARNING))
        if not any(isinstance(f, _HideTyrTracebacks) for f in handler.filters):
            handler.addFilter(_HideTyrTracebacks())
    quiet_libraries()


def quiet_libraries() -> None:
    """No per-file loading bars from transformers and datasets: tyr shows its own progress."""
    from datasets.utils.logging import disable_progress_bar as datasets_quiet
    from transformers.utils.logging import disable_progress_bar as transformers_quiet

    transformers_quiet()
    datasets_quiet()
