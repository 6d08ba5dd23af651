"""Orchestration costs on the tiny preset, against a real ``prefect server`` on loopback:

- overhead: the flow (Prefect tasks, subflows, store commits, artifacts) vs the same work done with the plain core
  functions (calibration, teacher, iterations, baselines, exports, final evaluation), best of alternated repeats and
  the median of (flow, core) pairs (each pair's order alternates), the CPU the server spent per flow run, and the
  seconds each path spent in the local pruner's compute, and each path's seconds by phase (the flow's from its task
  runs' run times, the rest of its wall time as ``between``); once with the server sharing this host's cores at normal
  priority, once with it at nice 19 (standing in for a server on a host of its own); ``--set section.field=value``
  changes the run's config for both paths (``--set torch_threads=null``: torch's default thread count instead of the
  tiny preset's 1);
- resume cost: a run killed (SIGKILL) in iteration 2's search is started again under the same run id; seconds
  from that call to the start of the first task that does new work, and how many task runs came back ``Cached``;
- store throughput to a real SeaweedFS.

The server's database is a throwaway PostgreSQL cluster on loopback when PostgreSQL's binaries are on this host (the
production setup: ``docker/compose.yaml``), else SQLite; ``--database`` picks one.  On SQLite a write that meets a
locked database is answered 503 and the client retries ~2 s later, which the flow times then include.

``--preset smollm2-demo --repeats 1 --overhead-only --no-warmup`` measures the overhead on the real model instead
(minutes a run; without the warmup run the flow runs first, so any first-run cost is the flow's); ``--niced-only``
measures only the set with the server at nice 19.

Prints JSON lines.  python bench/orchestration.py [--database postgres|sqlite] [--preset P] [--repeats N]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pwd
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from scratch import scratch_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(scratch_dir("tyr-prefect-")))
# a search long enough that the kill lands inside iteration 2's search, with generations left to run
RESUME_OVERRIDES = ["search.generations=6"]


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def core_seconds(preset: str = "tiny-test", overrides: list[str] | None = None) -> float:
    """The flow's work with plain core functions (no Prefect, no store): calibration and held-out windows,
    teacher, every iteration, the baselines, the exports and the final evaluation, in the flow's order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.recipes import resolve_config
    from flows.tyr import use_torch_threads
    from tyr_core.calibration import eval_windows, load_documents
    from tyr_core.evaluate import perplexity
    from tyr_core.export import save_compact, save_masked, write_sparsity_report
    from tyr_core.families import resolve_model
    from tyr_core.fitness import TeacherTopK, write_teacher_topk
    from tyr_core.layerwise import LayerwiseModel
    from tyr_core.param_count import dense_params, layout_params
    from tyr_core.pipeline import (
        apply_layout,
        calibration_windows,
        initial_centres,
        magnitude_layout,
        run_iteration_local,
    )
    from tyr_core.supernet import SupernetReader
    from tyr_runtime.real_assets import resolve_corpus

    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    lap = Lap(phases)
    cfg = resolve_config(preset, overrides=overrides)
    use_torch_threads(cfg.torch_threads)  # as the flow does
    folder = resolve_model(cfg.model.source)
    tok = AutoTokenizer.from_pretrained(folder)
    cal = cfg.calibration.model_copy(update={"files": resolve_corpus(cfg.calibration.files)})
    windows = calibration_windows(cal, tok)
    heldout = eval_windows(tok, load_documents(resolve_corpus(cfg.eval.files)), cfg.eval.seq_len)
    heldout = heldout[: cfg.eval.max_windows]
    lap("calibrate")
    lm = LayerwiseModel(folder)
    geo = lm.geometry

    def dense():
        return AutoModelForCausalLM.from_pretrained(folder).eval()

    work = scratch_dir("tyr-core-run-")
    model = dense()
    write_teacher_topk(
        lambda ids: model(ids).logits,
        windows[: cfg.teacher.max_windows],
        cfg.teacher.topk,
        work / "t",
        cfg.teacher.windows_per_shard,
    )
    lap("teacher")
    centres = initial_centres(geo, cfg.prune)
    for it in range(1, cfg.prune.iterations + 1):
        res = run_iteration_local(folder, windows, TeacherTopK(work / "t"), cfg, it, centres, work)
        centres = res.next_centres
        lap.split({"build": res.supernet_s}, rest="search")  # search: its model, generations, validation
        if it == 1:  # the flow's evaluate-baselines
            reader = SupernetReader(work / "iter-1")
            model = dense()
            report = {"dense_ppl": perplexity(model, heldout), "dense_params": dense_params(lm.config)}
            apply_layout(model, uniform := reader.layout([0] * len(reader.sublayers)), geo)
            report |= {"uniform_ppl": perplexity(model, heldout), "uniform_params": layout_params(lm.config, uniform)}
            model = dense()
            apply_layout(model, magnitude_layout(model, geo, reader.sublayers), geo)
            report["magnitude_ppl"] = perplexity(model, heldout)
            lap("baselines")
    layout = SupernetReader(work / f"iter-{cfg.prune.iterations}").layout(res.levels)
    exporters = {"compact": save_compact, "masked": save_masked}
    for fmt in cfg.export.formats:
        exporters[fmt](dense(), layout, work / fmt, tokenizer=tok)
        if cfg.export.plot:
            write_sparsity_report(lm.config, layout, work / fmt)
    lap("export")
    model = dense()
    apply_layout(model, layout, geo)
    report |= {"tyr_ppl": perplexity(model, heldout), "tyr_params": layout_params(lm.config, layout)}
    lap("evaluate")
    return time.perf_counter() - t0, phases


class Lap:
    """Adds the seconds since the last lap to ``phases[name]``."""

    def __init__(self, phases: dict[str, float]) -> None:
        self.phases, self.last = phases, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now

    def split(self, parts: dict[str, float], rest: str) -> None:
        """Seconds since the last lap, of which ``parts`` were timed inside; what is left goes to ``rest``."""
        for name, seconds in parts.items():
            self.phases[name] = self.phases.get(name, 0.0) + seconds
        self.last += sum(parts.values())
        self(rest)


# the flow's task runs by phase, as the core path's laps name them (plan and supernet-index: the build's bookkeeping)
FLOW_PHASES = {
    "calibrate": "calibrate",
    "teacher": "teacher",
    "plan": "build",
    "layer-stats": "build",
    "local-prune": "build",
    "accumulate": "build",
    "supernet-index": "build",
    "search-generation": "search",
    "recentre": "search",  # the winner's validation fitness
    "evaluate-baselines": "baselines",
    "export": "export",
    "evaluate": "evaluate",
}


def flow_seconds(
    store: str,
    run_id: str,
    preset: str = "tiny-test",
    overrides: list[str] | None = None,
    api: httpx.Client | None = None,
) -> tuple[float, dict[str, float]]:
    """The flow's wall seconds and, given the server's ``api``, its task runs' seconds by phase (the rest of the wall
    time, between and around task runs, is the phase ``between``)."""
    from flows.tyr import tyr

    t0 = time.perf_counter()
    state = tyr(preset=preset, run_id=run_id, store_url=store, overrides=overrides, return_state=True)
    total = time.perf_counter() - t0
    state.result()  # raises if the run failed
    phases: dict[str, float] = {}
    if api is not None:
        for run in task_runs(api, str(state.state_details.flow_run_id)):
            phase = FLOW_PHASES.get(run["name"].rsplit("-", 1)[0])
            if phase is not None and run["total_run_time"]:
                phases[phase] = phases.get(phase, 0.0) + run["total_run_time"]
        phases["between"] = total - sum(phases.values())
    return total, phases


def store_throughput() -> dict:
    from tyr_core.store import commit_bytes, commit_file, fetch_verified, read_verified
    from tyr_runtime.seaweed import EmbeddedSeaweed
    from tyr_runtime.storage import run_store

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    blobs = [random.randbytes(2 << 20) for _ in range(40)]  # 80 MB of copy-sized objects
    big = scratch_dir("tyr-big-") / "big.bin"
    big.write_bytes(random.randbytes(20 << 20))  # + 20 MB through the multipart file path
    with EmbeddedSeaweed(scratch_dir("tyr-weed-data-")) as s3:
        store = run_store(s3.store_url, "bench", endpoint_url=s3.endpoint_url)
        t0 = time.perf_counter()
        for i, b in enumerate(blobs):
            commit_bytes(store, f"c/{i}.bin", b, "h")
        commit_file(store, "c/big.bin", big, "h")
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(len(blobs)):
            read_verified(store, f"c/{i}.bin")
        fetch_verified(store, "c/big.bin", big.with_suffix(".dl"))
        read_s = time.perf_counter() - t0
    mb = (sum(map(len, blobs)) + big.stat().st_size) / 1e6
    return {"mb": round(mb), "write_mb_s": round(mb / write_s, 1), "read_mb_s": round(mb / read_s, 1)}


def cpu_seconds(pgids: tuple[int, ...]) -> float:
    """CPU seconds (user + system) used so far by the live processes of some process groups (the Prefect server and
    its database)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) in pgids:  # fields after the command: state, ppid, pgrp, ..., utime (11), stime (12)
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bindir() -> Path | None:
    installed = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    found = shutil.which("initdb") or (installed[-1] if installed else None)
    return Path(os.path.realpath(found)).parent if found else None


@contextlib.contextmanager
def postgres():
    """A throwaway PostgreSQL cluster in a temp dir on a free loopback port; yields (connection URL, postmaster pid).

    PostgreSQL refuses to run as root, so under root the cluster belongs to the ``postgres`` user."""
    bindir = postgres_bindir()
    if bindir is None:
        raise SystemExit("--database postgres: no PostgreSQL found (initdb); install it or pass --database sqlite")
    root = scratch_dir("tyr-pg-")
    as_user: list[str] = []
    if os.geteuid() == 0:
        os.chown(root, pwd.getpwnam("postgres").pw_uid, -1)
        as_user = ["runuser", "-u", "postgres", "--"]
    port, data = free_port(), root / "data"
    quiet = {"stdout": subprocess.DEVNULL, "check": True}
    subprocess.run([*as_user, bindir / "initdb", "-D", data, "-U", "prefect", "--auth=trust", "-E", "UTF8"], **quiet)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    ctl = [*as_user, bindir / "pg_ctl", "-D", data]
    subprocess.run([*ctl, "-o", options, "-l", root / "log", "-w", "start"], **quiet)
    try:
        subprocess.run([bindir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect"], **quiet)
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect", postmaster
    finally:
        subprocess.run([*ctl, "-w", "stop", "-m", "fast"], **quiet)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def database(kind: str):
    """Yields (the server's database URL or None for Prefect's default SQLite, pgids to count CPU of)."""
    if kind == "sqlite":
        yield None, ()
        return
    with postgres() as (url, postmaster):
        yield url, (os.getpgid(postmaster),)


@contextlib.contextmanager
def prefect_server(database_url: str | None, database_pgids: tuple[int, ...], services: bool = True):
    """A real ``prefect server start`` on a free loopback port; this process and its children use it.

    ``api.server_pgids``: the process groups whose CPU is the server's (its own and its database's)."""
    port = free_port()
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        + ([] if services else ["--no-services"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    api = httpx.Client(base_url=os.environ["PREFECT_API_URL"], timeout=30)
    try:
        for _ in range(240):
            with contextlib.suppress(httpx.HTTPError):
                if api.get("/health").status_code == 200:
                    break
            time.sleep(0.5)
        api.server_pgids = (server.pid, *database_pgids)
        yield api
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def kill_during_search(store: str, run_id: str) -> None:
    """Run the flow in a child process and SIGKILL it once iteration 2's first generation is committed."""
    from tyr_core import keys
    from tyr_core.store import is_committed
    from tyr_runtime.storage import run_store

    code = (
        "from flows.tyr import tyr; "
        f"tyr(preset='tiny-test', run_id={run_id!r}, store_url={store!r}, overrides={RESUME_OVERRIDES!r})"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    target = keys.search_state_key(2, 1)
    deadline = time.monotonic() + 600
    while not is_committed(run_store(store, run_id), target):
        if child.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the run to kill ended (rc {child.returncode}) before {target} was committed")
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()


def task_runs(api: httpx.Client, flow_run_id: str) -> list[dict]:
    """Task runs of a flow run and of its iteration subflows, paged."""
    body = {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}}
    runs = [flow_run_id, *(child["id"] for child in api.post("/flow_runs/filter", json=body).json())]
    found: list[dict] = []
    while True:
        body = {"flow_runs": {"id": {"any_": runs}}, "sort": "EXPECTED_START_TIME_ASC", "offset": len(found)}
        page = api.post("/task_runs/filter", json={**body, "limit": 200}).json()
        found += page
        if len(page) < 200:
            return found


# task runs that are not new work: bookkeeping that runs on every resume by design (it commits nothing new), and
# the task run Prefect creates to stand for a subflow
NOT_NEW_WORK = ("garbage-collect", "summarize", "tyr-iteration")


def wait_until_idle(pgids: tuple[int, ...], timeout: float = 120) -> float:
    """Seconds until the server has been idle (under 10% of a core) for a second."""
    t0 = time.monotonic()
    quiet, last = 0, cpu_seconds(pgids)
    while quiet < 2 and time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        now = cpu_seconds(pgids)
        quiet, last = (quiet + 1 if now - last < 0.05 else 0), now
    return time.monotonic() - t0


def resume_cost(api: httpx.Client, store: str, run_id: str, settle: bool) -> dict:
    """Seconds from starting the killed run again (same run id, new flow run) to its first task doing new work.

    ``settle``: first wait until the server is idle (right after the kill it may still be recording the killed run's
    events, on these same 2 cores); a person pressing Retry, or zombie detection (90 s of missed heartbeats), comes
    later than that.
    """
    from flows.tyr import tyr

    kill_during_search(store, run_id)
    settled = wait_until_idle(api.server_pgids) if settle else 0.0
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    state = tyr(preset="tiny-test", run_id=run_id, store_url=store, overrides=RESUME_OVERRIDES, return_state=True)
    total = time.perf_counter() - t0
    runs = task_runs(api, str(state.state_details.flow_run_id))
    new = [r for r in runs if r["state_name"] == "Completed" and not r["name"].startswith(NOT_NEW_WORK)]
    first = min(new, key=lambda r: r["start_time"])
    first_start = datetime.fromisoformat(first["start_time"].replace("Z", "+00:00"))
    return {
        "server_settled_first_s": round(settled, 1),
        "seconds_to_first_new_task": round((first_start - started).total_seconds(), 2),
        "first_new_task": first["name"],
        "resume_total_s": round(total, 1),
        "task_runs_cached": sum(r["state_name"] == "Cached" for r in runs),
        "task_runs_new": len(new),
        "new_tasks": sorted({r["name"].rsplit("-", 1)[0] for r in new}),
    }


class PruneClock:
    """Wall seconds spent in the local pruner's compute, ``prepare`` (a sublayer's damped H, G, H^-1) and
    ``prune_copy`` (one copy), which both paths call the same way: the flow through its local-prune tasks, the core
    path through ``prune_all``. Where the flow's ops wait at OpenMP barriers when the server deschedules torch's
    second thread (``torch_threads``), this grows with them."""

    def __init__(self) -> None:
        from tyr_core import supernet_build

        self.seconds = 0.0
        for name in ("prepare", "prune_copy"):
            setattr(supernet_build, name, self._timed(getattr(supernet_build, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed

    def lap(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def overhead(
    api: httpx.Client, store: str, label: str, preset: str, repeats: int, overrides: list[str], clock: PruneClock
) -> dict:
    """Flow vs core, alternated and repeated: a run is seconds long and the host's speed drifts (2x within an hour
    here; within one set, runs of either kind got 20-30% slower from first to last), so the best of each and the
    median of (flow, core) pairs, not one run. The pairs take turns at which runs first (flow-core, core-flow, ...),
    so a steady drift favours neither."""
    flows, cores, server_cpu, flow_prunes, core_prunes = [], [], [], [], []
    flow_phases, core_phases = [], []

    def run_flow(r: int) -> None:
        wait_until_idle(api.server_pgids)
        before = cpu_seconds(api.server_pgids)
        clock.lap()
        seconds, phases = flow_seconds(store, f"{label}-{r}", preset, overrides, api)
        flows.append(seconds)
        flow_phases.append(phases)
        flow_prunes.append(clock.lap())
        wait_until_idle(api.server_pgids)  # the server's leftover work must not slow the next run
        server_cpu.append(cpu_seconds(api.server_pgids) - before)

    def run_core() -> None:
        clock.lap()
        seconds, phases = core_seconds(preset, overrides)
        cores.append(seconds)
        core_phases.append(phases)
        core_prunes.append(clock.lap())

    for r in range(repeats):
        if r % 2 == 0:
            run_flow(r)
            run_core()
        else:
            run_core()
            run_flow(r)
    core, flow = min(cores), min(flows)
    return {
        "preset": preset,
        "overrides": overrides,
        "core_s": round(core, 1),
        "flow_s": round(flow, 1),
        "ratio": round(flow / core, 2),
        "overhead_s": round(flow - core, 1),
        "median_paired_ratio": round(statistics.median(f / c for f, c in zip(flows, cores, strict=True)), 2),
        "all_core_s": [round(t, 1) for t in cores],
        "all_flow_s": [round(t, 1) for t in flows],
        "server_cpu_s_per_flow_run": round(statistics.median(server_cpu), 1),
        "local_prune_s_median": {
            "flow": round(statistics.median(flow_prunes), 3),
            "core": round(statistics.median(core_prunes), 3),
        },
        "phases_s_median": {
            "flow": median_phases(flow_phases),
            "core": median_phases(core_phases),
        },
    }


def median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: round(statistics.median(run.get(name, 0.0) for run in runs), 1) for name in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = "postgres" if postgres_bindir() else "sqlite"
    parser.add_argument("--database", choices=["postgres", "sqlite"], default=default, help=f"default: {default}")
    parser.add_argument("--preset", default="tiny-test", help="the run whose overhead is measured (default tiny-test)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="section.field=value for both paths (repeatable)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="alternated (flow, core) pairs per set (default 5)")
    parser.add_argument("--overhead-only", action="store_true", help="only the overhead at normal priority")
    parser.add_argument(
        "--niced-only", action="store_true", help="only the overhead with the server at nice 19 (its own host, roughly)"
    )
    parser.add_argument(
        "--no-services",
        action="store_true",
        help="the server without its background services (a probe: it records no task runs, so no UI of them)",
    )
    parser.add_argument("--no-warmup", action="store_true", help="no warmup flow run first (for long presets)")
    args = parser.parse_args()
    store = f"file://{scratch_dir('tyr-store-')}"
    clock = PruneClock()
    with database(args.database) as (url, pgids), prefect_server(url, pgids, not args.no_services) as api:
        emit(metric="server_database", database=args.database)
        if not args.no_warmup:
            # model conversion and texts are ready afterwards
            flow_seconds(store, "warmup", args.preset, args.overrides)
        if not args.niced_only:
            # the server (its CPU per flow run is reported) shares this host's cores with the flow
            measured = overhead(api, store, "measured", args.preset, args.repeats, args.overrides, clock)
            emit(metric="orchestration_overhead", **measured)
            if args.overhead_only:
                return
        # the same with the server at the lowest CPU priority: what the flow costs when the server's work does not
        # compete with it, as in a deployment where the server runs on a host of its own
        for pgid in api.server_pgids:
            os.setpriority(os.PRIO_PGRP, pgid, 19)
        niced = overhead(api, store, "niced", args.preset, args.repeats, args.overrides, clock)
        emit(metric="orchestration_overhead_server_niced", **niced)
        if args.niced_only:
            return
        rerun, _ = flow_seconds(store, "measured-0", args.preset, args.overrides)
        emit(metric="rerun_committed_run", seconds=round(rerun, 1))
        emit(metric="resume_right_after_kill", **resume_cost(api, store, "resume-now", settle=False))
        emit(metric="resume_after_kill", **resume_cost(api, store, "resume", settle=True))
    emit(metric="store_throughput_seaweedfs", **store_throughput())


if __name__ == "__main__":
    main()
