"""``tyr runs``, ``tyr runs show`` and ``tyr runs gc``: what the store holds, as tables or JSON."""

from __future__ import annotations

import argparse
import contextlib
from typing import TYPE_CHECKING

from tyr_core.errors import RunLockedError

from .common import (
    InvalidInput,
    add_command,
    fmt_params,
    fmt_ppl,
    human_bytes,
    json_flag,
    out_console,
    positive_int,
    print_json,
    refusing,
    store_flags,
)
from .location import embedded_data_dir, existing_run_store, open_existing_location, open_location

if TYPE_CHECKING:
    from rich.table import Table

    from tyr_core.store import Store


def cmd_runs(args: argparse.Namespace) -> int:
    from rich.table import Table

    from tyr_runtime.run_status import list_run_ids, run_summary

    with contextlib.ExitStack() as stack:
        location = open_existing_location(args, stack)
        if location is None:
            return _no_runs(args, f"the embedded store (no data in {embedded_data_dir()} yet)")
        with refusing():
            base = location.base()
            rows = [run_summary(location.run(run_id), run_id) for run_id in list_run_ids(base)]
    if getattr(args, "json", False):
        print_json(rows)
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
            human_bytes(r["bytes_stored"]),
        )
    out_console.print(table if rows else f"no runs in {base.url}", highlight=False)
    return 0


def _no_runs(args: argparse.Namespace, where: str) -> int:
    if getattr(args, "json", False):
        print_json([])
    else:
        out_console.print(f"no runs in {where}", highlight=False)
    return 0


def _summary(store: Store, run_id: str) -> dict:
    """The run's detailed summary; an unreadable ``run.json`` is refused (exit 2), like a run that does not exist."""
    from tyr_runtime.run_status import run_summary, saved_config

    with refusing():
        saved = saved_config(store, run_id)
    return run_summary(store, run_id, detail=True, saved=saved)


def cmd_runs_show(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        location = open_existing_location(args, stack)
        if location is None:
            raise InvalidInput(
                f"run {args.run_id!r} does not exist: the embedded store has no data in {embedded_data_dir()} yet"
            )
        with refusing():
            store = existing_run_store(location, args.run_id)
        summary = _summary(store, args.run_id)
    if getattr(args, "json", False):
        print_json(summary)
    else:
        print_run(summary)
    return 0


def print_run(s: dict) -> None:
    from rich.table import Table

    out_console.print(
        f"[bold]{s['run_id']}[/bold] {s['status']}: iteration {s['iteration']}/{s['iterations_total']}, generation "
        f"{s['generation']}/{s['generations_total']}, {human_bytes(s['bytes_stored'])} in {s['objects']} objects "
        f"at {s['store_url']}",
        highlight=False,
    )
    if s["iterations"]:
        table = Table(title="iterations (* the final model)")
        for column in ("iteration", "search KL", "validation KL", "attention sparsity", "MLP sparsity"):
            table.add_column(column, justify="right")
        for r in s["iterations"]:
            attn, mlp = _mean_by_kind(r["sparsities"])
            mark = "*" if r["iteration"] == s["final_iteration"] else ""
            table.add_row(
                f"{mark}{r['iteration']}",
                _kl(r.get("fitness")),
                _kl(r.get("validation_fitness")),
                f"{attn:.1%}",
                f"{mlp:.1%}",
            )
        out_console.print(table)
        out_console.print(_why_chosen(s), highlight=False)
    if s["final_sparsities"]:
        out_console.print(_sparsity_table(s["final_sparsities"], s["final_iteration"]))
    if s["report"]:
        report, base = s["report"], s["report"].get("baselines", {})
        out_console.print(
            f"held-out perplexity: dense {fmt_ppl(base.get('dense_ppl'))}, uniform {fmt_ppl(base.get('uniform_ppl'))}"
            f", tyr {fmt_ppl(report.get('tyr_ppl'))}; parameters {fmt_params(base.get('dense_params'))} -> "
            f"{fmt_params(report.get('tyr_params'))}"
        )
    if s["exports"]:
        out_console.print(f"exports: {', '.join(s['exports'])} (tyr export {s['run_id']} --format F --out DIR)")


def _kl(value: float | None) -> str:
    return f"{value:.5g}" if isinstance(value, int | float) else "-"


def _why_chosen(s: dict) -> str:
    """Which iteration is the final model and why: the lowest validation KL, the winner's KL on every validation
    window (the same windows for every iteration), where the search KL is on the search's last minibatch only."""
    final = s["final_iteration"]
    if not s["report"]:
        return f"final model so far: iteration {final}, the latest (the choice is made when the run completes)"
    if not any(isinstance(r.get("validation_fitness"), int | float) for r in s["iterations"]):
        return f"final model: iteration {final}, as the run's report names it"
    return (
        f"final model: iteration {final}, the lowest validation KL (every validation window, the same for each "
        "iteration; the search KL covers the search's last minibatch only)"
    )


def _mean_by_kind(sparsities: dict[str, float]) -> tuple[float, float]:
    attn = [v for k, v in sparsities.items() if k.endswith(".self_attn")]
    mlp = [v for k, v in sparsities.items() if k.endswith(".mlp")]
    return (sum(attn) / len(attn) if attn else 0.0), (sum(mlp) / len(mlp) if mlp else 0.0)


def _sparsity_table(sparsities: dict[str, float], iteration: int | None) -> Table:
    """One row per layer: the attention and MLP sparsity the search chose."""
    from rich.table import Table

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
        summary = _summary(store, args.run_id)
        if summary["status"] == "running":
            lock = summary["lock"] or {}
            raise RunLockedError(
                f"run {args.run_id!r} is running (host {lock.get('host')}, pid {lock.get('pid')}); its flow collects "
                "garbage after each iteration. Run gc once it has stopped"
            )
        # a driver may start between that look and the deletions: collect under the run's lock, as the flow does
        from tyr_runtime.lock import acquire_lock, release_lock

        try:
            acquire_lock(store, args.run_id)
        except RunLockedError as err:
            advice = "its flow collects garbage after each iteration: run gc once it has stopped"
            raise RunLockedError(f"{err} ({advice})") from None
        stack.callback(release_lock, store)
        last = summary["final_iteration"]
        keep_last = args.keep_last or summary["config"].get("keep_last", 1)
        report = collect_garbage(store, last, keep_last) if last else None
    freed, deleted = (report.bytes_freed, report.keys_deleted) if report else (0, 0)
    if getattr(args, "json", False):
        print_json({"run_id": args.run_id, "bytes_freed": freed, "keys_deleted": deleted, "keep_last": keep_last})
    else:
        out_console.print(
            f"{args.run_id}: freed {human_bytes(freed)} ({deleted} keys); the supernets of the last {keep_last} "
            "committed iteration(s) are kept"
        )
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(sub, "runs", cmd_runs, "list runs; show or garbage-collect one", "List the runs in the store.")
    store_flags(p)
    json_flag(p)
    runs = p.add_subparsers(title="commands", metavar="{show,gc}")
    show = add_command(
        runs, "show", cmd_runs_show, "status, per-iteration results, final sparsities and bytes of a run"
    )
    show.add_argument("run_id", metavar="ID", help="the run's id (tyr runs lists them)")
    store_flags(show)
    json_flag(show)
    gc = add_command(runs, "gc", cmd_runs_gc, "delete the stats and supernets of a run's earlier iterations")
    gc.add_argument("run_id", metavar="ID", help="the run's id (tyr runs lists them)")
    gc.add_argument("--keep-last", type=positive_int, metavar="N", help="iterations to keep (default: the run's)")
    store_flags(gc)
    json_flag(gc)
