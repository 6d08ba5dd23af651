"""The ``tyr`` command line: prune, runs, eval, export, store serve, demo, presets.

Exit codes: 0 success, 1 the run failed, 2 invalid input (config, preset, store URL, arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tyr_core import artifacts as keys
from tyr_core.errors import ConfigError, GridError, StoreError, TyrError

console = Console(stderr=True)
out = Console()

USAGE_ERRORS = (ConfigError, GridError, StoreError)


def _store_env(args) -> tuple[str | None, str | None]:
    return args.store or os.environ.get("TYR_STORE_URL"), args.endpoint_url or os.environ.get("TYR_S3_ENDPOINT_URL")


def _embedded(stack: ExitStack, url: str | None, endpoint: str | None) -> tuple[str, str | None]:
    """Start the embedded SeaweedFS when no store is configured; returns (store url, endpoint)."""
    if url:
        return url, endpoint
    from tasks.seaweed import EmbeddedSeaweed

    s3 = stack.enter_context(EmbeddedSeaweed())
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "tyr-embedded")  # the embedded server is anonymous
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "tyr-embedded")
    console.print(f"[dim]embedded S3 store (SeaweedFS) at {s3.endpoint_url}, data in {s3.data_dir}[/dim]")
    return s3.store_url, s3.endpoint_url


class StoreProgress(threading.Thread):
    """Polls the run's store for committed keys and drives rich progress bars (layers, generations)."""

    def __init__(self, store, config, progress: Progress):
        super().__init__(daemon=True)
        self.store, self.config, self.progress = store, config, progress
        self.stop = threading.Event()
        self.tasks: dict[str, int] = {}

    def _bar(self, name: str, total: int, done: int) -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total)
        self.progress.update(self.tasks[name], completed=done, total=total)

    def poll(self) -> None:
        from tyr_core.store import is_committed, read_json

        for it in range(1, self.config.prune.iterations + 1):
            if not is_committed(self.store, keys.plan_key(it)):
                return
            plan = read_json(self.store, keys.plan_key(it))
            copies = sum(s["hi"] - s["lo"] + 1 for s in plan["sublayers"])
            done = len([k for k in self.store.list(f"iter-{it}/supernet/") if k.endswith(".safetensors.manifest.json")])
            if is_committed(self.store, keys.result_key(it)) or is_committed(self.store, keys.supernet_index_key(it)):
                done = copies
            self._bar(f"iteration {it}: supernet copies", copies, done)
            gens = len([k for k in self.store.list(f"iter-{it}/search/") if k.endswith(".json")]) // 2
            if done >= copies and self.config.search.generations:
                self._bar(f"iteration {it}: search generations", self.config.search.generations, gens)

    def run(self) -> None:
        while not self.stop.wait(2.0):
            try:
                self.poll()
            except Exception:  # progress is cosmetic: never let it break the run
                pass


def cmd_prune(args) -> int:
    from flows.presets import resolve_config
    from tasks.runs import default_run_id
    from tasks.storage import run_store

    config = resolve_config(args.preset, overrides=args.set)
    run_id = args.run_id or default_run_id(config)
    url, endpoint = _store_env(args)
    with ExitStack() as stack:
        url, endpoint = _embedded(stack, url, endpoint)
        store = run_store(url, run_id, endpoint_url=endpoint)
        console.print(f"run [bold]{run_id}[/bold] in {store.url}")
        result, wall = _run_with_progress(args, config, run_id, url, endpoint, store)
        _copy_exports(store, result, Path(args.out or Path("out") / run_id))
    if args.json:
        out.print_json(json.dumps({**result, "wall_s": wall}, default=str))
    else:
        _summary(result, wall, Path(args.out or Path("out") / run_id))
    return 0


def _run_with_progress(args, config, run_id, url, endpoint, store) -> tuple[dict, float]:
    from flows.tyr import tyr

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    t0 = time.perf_counter()
    with Progress(*columns, console=console, disable=args.json) as progress:
        poller = StoreProgress(store, config, progress)
        poller.start()
        try:
            result = tyr(
                preset=args.preset, run_id=run_id, store_url=url, endpoint_url=endpoint, overrides=list(args.set or [])
            )
        finally:
            poller.stop.set()
        poller.poll()
    return result, time.perf_counter() - t0


def _copy_exports(store, result: dict, dest: Path) -> None:
    from tyr_core.store import fetch_verified

    for exp in result.get("exports", []):
        for name in exp.get("files", []):
            fetch_verified(store, exp["prefix"] + name, dest / exp["format"] / name)


def _summary(result: dict, wall: float, dest: Path) -> None:
    report = result["report"]
    base = report["baselines"]
    table = Table(title=f"tyr run {result['run_id']}")
    for col in ("model", "held-out ppl", "parameters", "block params removed"):
        table.add_column(col)
    table.add_row("dense", f"{base['dense_ppl']:.2f}", f"{base['dense_params']['total']:,}", "0%")
    table.add_row(
        "magnitude (uniform)",
        f"{base['magnitude_ppl']:.2f}",
        f"{base['uniform_params']['total']:,}",
        f"{base['uniform_params']['removed_fraction']:.1%}",
    )
    table.add_row(
        "uniform (Týr local prune)",
        f"{base['uniform_ppl']:.2f}",
        f"{base['uniform_params']['total']:,}",
        f"{base['uniform_params']['removed_fraction']:.1%}",
    )
    table.add_row(
        "tyr (searched)",
        f"{report['tyr_ppl']:.2f}",
        f"{report['tyr_params']['total']:,}",
        f"{report['tyr_params']['removed_fraction']:.1%}",
    )
    out.print(table)
    out.print(
        f"wall time {wall / 60:.1f} min; exports in {dest.resolve()} "
        f"(sparsity plot: {dest.resolve() / 'compact' / 'sparsity_distribution.png'})"
    )


def _base_store(args):
    from tasks.runs import default_store_url
    from tasks.storage import open_store

    url, endpoint = _store_env(args)
    return open_store(url or default_store_url(), endpoint), url or default_store_url(), endpoint


def run_summary(store, run_id: str) -> dict:
    """Status, per-iteration results, final per-sublayer sparsities and bytes stored of one run."""
    from tyr_core.store import is_committed, read_json

    if not is_committed(store, keys.RUN_CONFIG):
        raise ConfigError(f"run {run_id!r} does not exist in {store.url}")
    cfg = read_json(store, keys.RUN_CONFIG)["config"]
    n_iter = cfg["prune"]["iterations"]
    iterations = [
        read_json(store, keys.result_key(i)) for i in range(1, n_iter + 1) if is_committed(store, keys.result_key(i))
    ]
    final = keys.report_key(f"final-{n_iter}")
    status = "complete" if is_committed(store, final) else ("running" if store.exists(keys.LOCK_KEY) else "incomplete")
    listed = store.list("")
    gens = [k for k in listed if "/search/gen-" in k and not keys.is_manifest(k)]
    return {
        "run_id": run_id,
        "status": status,
        "iteration": len(iterations) + (0 if status == "complete" else 1),
        "generations_committed": len(gens),
        "iterations": iterations,
        "final_sparsities": iterations[-1]["sparsities"] if len(iterations) == n_iter else {},
        "report": read_json(store, final) if status == "complete" else None,
        "bytes_stored": sum(store.size(k) for k in listed),
    }


def cmd_runs(args) -> int:
    from tasks.storage import run_store

    base, url, endpoint = _base_store(args)
    if args.action == "show":
        summary = run_summary(run_store(url, args.run_id, endpoint_url=endpoint), args.run_id)
        if args.json:
            out.print_json(json.dumps(summary))
        else:
            out.print({k: v for k, v in summary.items() if k not in ("iterations", "report")})
        return 0
    if args.action == "gc":
        from tyr_core.store import collect_garbage

        store = run_store(url, args.run_id, endpoint_url=endpoint)
        last = run_summary(store, args.run_id)["iteration"]
        report = collect_garbage(
            store, max(1, last - (0 if store.exists(keys.result_key(last)) else 1)), args.keep_last
        )
        out.print_json(json.dumps({"bytes_freed": report.bytes_freed, "keys_deleted": report.keys_deleted}))
        return 0
    ids = sorted({k.split("/")[1] for k in base.list("runs/") if k.endswith("/" + keys.RUN_CONFIG)})
    rows = [run_summary(run_store(url, r, endpoint_url=endpoint), r) for r in ids]
    if args.json:
        out.print_json(
            json.dumps(
                [
                    {k: r[k] for k in ("run_id", "status", "iteration", "generations_committed", "bytes_stored")}
                    for r in rows
                ]
            )
        )
        return 0
    table = Table(title=f"runs in {base.url}")
    for col in ("run", "status", "iteration", "generations", "bytes"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["run_id"], r["status"], str(r["iteration"]), str(r["generations_committed"]), f"{r['bytes_stored']:,}"
        )
    out.print(table)
    return 0


def cmd_eval(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tyr_core.export  # noqa: F401  (registers tyr_llama for compact exports)
    from tasks.assets import resolve_corpus
    from tyr_core.calibration import eval_windows, load_documents
    from tyr_core.evaluate import perplexity
    from tyr_core.families import resolve_model
    from tyr_core.params import count_module_params

    folder = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    docs = load_documents(resolve_corpus(args.text or []), args.dataset, args.dataset_config, args.split)
    windows = eval_windows(tok, docs, args.seq_len)[: args.max_windows]
    result = {
        "model": str(args.model),
        "ppl": perplexity(model, windows),
        "tokens": windows.numel(),
        "params": count_module_params(model),
    }
    out.print_json(json.dumps(result)) if args.json else out.print(result)
    return 0


def cmd_export(args) -> int:
    from tasks.storage import run_store
    from tyr_core.store import fetch_verified, is_committed, read_json

    _, url, endpoint = _base_store(args)
    store = run_store(url, args.run, endpoint_url=endpoint)
    marker = keys.export_prefix(args.format) + "files.json"
    if not is_committed(store, marker):
        from tasks.finish import export
        from tasks.workspace import RunRef

        iterations = read_json(store, keys.RUN_CONFIG)["config"]["prune"]["iterations"]
        export.fn(RunRef(run_id=args.run, store_url=url, endpoint_url=endpoint), iterations, args.format)
    files = read_json(store, marker)["files"]
    for name in files:
        fetch_verified(store, keys.export_prefix(args.format) + name, Path(args.out) / name)
    out.print(f"{len(files)} files of the {args.format} export in {Path(args.out).resolve()}")
    return 0


def cmd_store_serve(args) -> int:
    from tasks.seaweed import EmbeddedSeaweed

    with EmbeddedSeaweed(Path(args.dir) if args.dir else None, args.port) as s3:
        out.print(
            f"SeaweedFS S3 at {s3.endpoint_url} (data in {s3.data_dir}); in another shell:\n"
            f"  export TYR_STORE_URL={s3.store_url} TYR_S3_ENDPOINT_URL={s3.endpoint_url}\n"
            "  export AWS_ACCESS_KEY_ID=tyr AWS_SECRET_ACCESS_KEY=tyr\nCtrl-C stops it."
        )
        try:
            while s3.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_presets(args) -> int:
    from flows.presets import PRESET_DIR, preset_names

    for name in preset_names():
        first = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        out.print(f"[bold]{name}[/bold]  {first}")
    return 0


def cmd_demo(args) -> int:
    console.print(
        "[bold]tyr demo[/bold]: prunes SmolLM2-135M to 50% on the CPU with the embedded S3 store and a "
        "local Prefect. Search budget: preset smollm2-demo (1 iteration: 9-level supernet on 64 x 256 "
        "Shakespeare tokens, 6 generations x 12 offspring). Takes about 10-15 minutes on 2 cores, at most 20."
    )
    args.preset, args.set, args.run_id, args.json = "smollm2-demo", [], None, False
    return cmd_prune(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tyr", description="Týr-the-Pruner: structural pruning of Llama-family LLMs")
    sub = p.add_subparsers(dest="command", required=True)

    def store_flags(sp) -> None:
        sp.add_argument("--store", help="store URL: file:///PATH or s3://BUCKET/PREFIX (default: $TYR_STORE_URL)")
        sp.add_argument("--endpoint-url", help="S3 endpoint (default: $TYR_S3_ENDPOINT_URL)")

    sp = sub.add_parser("prune", help="run (or resume) a pruning run")
    sp.add_argument("preset", help="preset name (tyr presets) or a config .yaml")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. prune.iterations=2")
    sp.add_argument("--run-id", help="run id (default: derived from the config, so re-running resumes)")
    sp.add_argument("--out", help="where to copy the exports (default: out/RUN_ID)")
    sp.add_argument("--json", action="store_true")
    store_flags(sp)
    sp.set_defaults(func=cmd_prune)

    sp = sub.add_parser("runs", help="list runs, show one, or garbage-collect one")
    sp.add_argument("action", nargs="?", choices=["list", "show", "gc"], default="list")
    sp.add_argument("run_id", nargs="?")
    sp.add_argument("--keep-last", type=int, default=1)
    sp.add_argument("--json", action="store_true")
    store_flags(sp)
    sp.set_defaults(func=cmd_runs)

    sp = sub.add_parser("eval", help="held-out perplexity and parameters of a model folder or GGUF")
    sp.add_argument("model")
    sp.add_argument("--text", nargs="+", help="text files (or @shakespeare/heldout)")
    sp.add_argument("--dataset")
    sp.add_argument("--dataset-config")
    sp.add_argument("--split", default="test")
    sp.add_argument("--seq-len", type=int, default=512)
    sp.add_argument("--max-windows", type=int, default=16)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("export", help="write a finished run's model in one format")
    sp.add_argument("run")
    sp.add_argument("--format", choices=["compact", "masked", "nemotron-nas"], default="compact")
    sp.add_argument("--out", required=True)
    store_flags(sp)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("store", help="the embedded S3 store")
    sp.add_argument("action", choices=["serve"])
    sp.add_argument("--dir")
    sp.add_argument("--port", type=int)
    sp.set_defaults(func=cmd_store_serve)

    sp = sub.add_parser("presets", help="list presets")
    sp.set_defaults(func=cmd_presets)

    sp = sub.add_parser("demo", help="the README demo: SmolLM2-135M to 50%% on the CPU")
    sp.add_argument("--out")
    store_flags(sp)
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "runs" and args.action in ("show", "gc") and not args.run_id:
        console.print("[red]error:[/red] tyr runs show|gc needs a RUN_ID")
        return 2
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        return args.func(args)
    except USAGE_ERRORS as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    except TyrError as err:
        console.print(f"[red]run failed:[/red] {err}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted: committed work is kept; run the same command again to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
