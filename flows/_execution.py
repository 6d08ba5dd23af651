"""How the ``tyr`` flow runs its steps in its process, apart from what they compute: torch's thread pool, the
iteration subflows' settings, where a layer's local prunes run, and an export that a format refuses."""

from __future__ import annotations

import itertools

from prefect import get_run_logger
from prefect.context import SettingsContext, get_settings_context
from prefect.settings import Settings

from tasks.export import export
from tasks.supernet import local_prune
from tyr_runtime.workspace import RunRef, workspace


def use_torch_threads(threads: int | None) -> None:
    """Size torch's intra-op pool for this run (``torch_threads``; None leaves torch's default). The flow owns its
    process under a worker, so the setting is the run's, not a library's side effect."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def local_prunes(ref: RunRef, iteration: int, layer: int, kinds: dict[int, list[str]]) -> list[dict]:
    """The local-prune tasks of one layer (``kinds``: the sublayers to prune at each level): ``concurrent_prunes``
    tasks at once through the task runner, each a consecutive share of the levels; their index entries, in level
    order.

    With ``concurrent_prunes=1`` (the default) the layer's one task runs in the flow's own thread instead. A
    task-runner thread that runs torch gets an OpenMP team of its own, and once the process has more OpenMP threads
    than cores, libgomp stops spinning at its barriers: every parallel region of every op, in every thread, then waits
    for workers to wake up. On CPU that made the SmolLM2 build 1.16x as long, with 25x the context switches
    (``python bench/prune_thread.py``).
    """
    levels = list(kinds)
    at_once = max(1, min(workspace(ref).config.concurrent_prunes, len(levels)))
    bounds = [len(levels) * i // at_once for i in range(at_once + 1)]
    shares = [{lv: kinds[lv] for lv in levels[lo:hi]} for lo, hi in itertools.pairwise(bounds)]
    if at_once == 1:
        return local_prune(ref, iteration, layer, shares[0])
    futures = [local_prune.submit(ref, iteration, layer, share) for share in shares]
    return [entry for future in futures for entry in future.result()]


# No heartbeats of its own for an iteration subflow: it runs in the run's process and thread, so the run's heartbeat
# already says whether it is alive; a heartbeat thread per subflow would add a thread and events that say nothing more.
# After a node dies, zombie detection marks the run Crashed; the subflow, like every task run, shows its last state
# until the run is retried and continues it.
_quiet_settings: tuple[Settings, Settings] | None = None  # (the run's settings, the same without heartbeats)


def without_heartbeats() -> SettingsContext:
    """The current settings with flow heartbeats off, built once per settings object: building Settings (what
    ``temporary_settings`` does on every call) took 0.17 s a subflow, measured with pyinstrument."""
    global _quiet_settings
    context = get_settings_context()
    if _quiet_settings is None or _quiet_settings[0] is not context.settings:
        quiet = context.settings.copy_with_update(updates={"flows.heartbeat_frequency": None})
        _quiet_settings = (context.settings, quiet)
    return SettingsContext(profile=context.profile, settings=_quiet_settings[1])


# the UI names each export's task run for its format (export-compact); the cache key and result are the task's own
_named_export = export.with_options(task_run_name="export-{fmt}")


def export_format(ref: RunRef, iteration: int, fmt: str) -> dict:
    """One export; a layout the format cannot express (e.g. Nemotron-NAS) is reported, not fatal to the run."""
    state = _named_export(ref, iteration, fmt, return_state=True)
    if state.is_completed():
        return state.result()
    get_run_logger().warning("export %s refused: %s", fmt, state.message)
    return {"format": fmt, "refused": state.message}
