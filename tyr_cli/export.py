"""``tyr export``: copy a finished run's export into a folder, producing the format first if the run did not."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from tyr_core import keys
from tyr_runtime.run_status import EXPORT_FORMATS, finished_iteration

from .common import add_command, err_console, out_console, print_json, refusing, store_flags
from .location import StoreLocation, existing_run_store, open_location
from .progress import quiet_libraries

if TYPE_CHECKING:
    from tyr_core.store import Store


def cmd_export(args: argparse.Namespace) -> int:
    from tyr_core.store import is_committed

    with contextlib.ExitStack() as stack:
        location = open_location(args, stack)
        with refusing():
            store = existing_run_store(location, args.run)
            last = finished_iteration(store, args.run)
        if not is_committed(store, keys.export_marker_key(args.format)):
            produce_export(location, args.run, last, args.format)
        files = download_export(store, args.format, Path(args.out))
    if args.json:
        print_json({"run_id": args.run, "format": args.format, "out": str(Path(args.out).resolve()), "files": files})
    else:
        out_console.print(f"{len(files)} files of the {args.format} export in {Path(args.out).resolve()}")
    return 0


def produce_export(location: StoreLocation, run_id: str, iteration: int, fmt: str) -> None:
    """Write a format the run did not export, with the export task's own function (committed to the store)."""
    from tasks.export import export
    from tyr_runtime.workspace import RunRef

    err_console.print(f"[dim]{run_id} has no {fmt} export yet: producing it[/dim]")
    quiet_libraries()
    export.fn(RunRef(run_id=run_id, store_url=location.url, endpoint_url=location.endpoint_url), iteration, fmt)


def download_export(store: Store, fmt: str, dest: Path) -> list[str]:
    """Copy a committed export into ``dest``, every file verified; a failed download leaves ``dest`` as it was."""
    from tyr_core.store import fetch_verified, read_json

    files = read_json(store, keys.export_marker_key(fmt))["files"]
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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
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
    store_flags(p)
