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
from tyr_core.config import EXPORT_FORMATS

from .common import add_command, err_console, out_console, print_json, refusing, store_flags
from .location import StoreLocation, existing_run_store, open_location
from .progress import quiet_libraries

if TYPE_CHECKING:
    from tyr_core.store import Store

# One line per format for --help: which engines load it, whether it needs remote code, whether it is exact.
FORMAT_HELP = {
    "gguf": "llama.cpp, Ollama, LM Studio; no remote code; exact",
    "nemotron-nas": "vLLM, SGLang; ships a config class; exact; serve-vllm runs",
    "compact": "transformers; tyr's remote code, from this install; exact",
    "masked": "loads as the source model; exact; full size, no speed-up",
}


def cmd_export(args: argparse.Namespace) -> int:
    from tyr_core.store import is_committed
    from tyr_runtime.run_status import finished_iteration

    with contextlib.ExitStack() as stack:
        location = open_location(args, stack)
        with refusing():
            store = existing_run_store(location, args.run)
            last = finished_iteration(store, args.run)
        if not is_committed(store, keys.export_marker_key(args.format)):
            with refusing():
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
    """Copy a committed export into ``dest``, every file verified; a failed download leaves ``dest`` as it was.

    A compact export's modeling code is written from the installed package, not taken from the store.
    """
    from tyr_core.export.compact import MODELING_FILES, write_modeling_files
    from tyr_core.store import fetch_verified, read_json

    files = read_json(store, keys.export_marker_key(fmt))["files"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    code = set(MODELING_FILES) if fmt == "compact" else set()
    try:
        for name in files:  # names are store keys, validated: no '..' can leave the folder
            if name not in code:
                fetch_verified(store, keys.export_prefix(fmt) + name, staging / name)
        if code:
            write_modeling_files(staging)
        for name in files:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, dest / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    formats = "\n".join(f"  {name:<13} {line}" for name, line in FORMAT_HELP.items())
    p = add_command(
        sub,
        "export",
        cmd_export,
        "copy a run's exported model into a folder",
        "Download a finished run's export (every file verified against its\n"
        "manifest), producing it first if the run did not export that format.\n"
        "Each folder has a model card (README.md) saying how to run it.\n\n"
        f"formats:\n{formats}",
    )
    p.add_argument("run", metavar="RUN", help="the run id (tyr runs lists them)")
    p.add_argument(
        "--format", choices=EXPORT_FORMATS, required=True, metavar="FORMAT", help="one of: " + ", ".join(EXPORT_FORMATS)
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced files only)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    store_flags(p)
