"""Ray actors for a run with ``execution.engine=ray``: the replicas that hold the run's models on their devices, and
the evaluator the search's driver scores its pools with.

The Prefect tasks stay in the flow's process (one per layer step, one per search generation; the RNG, selection and
every commit of the search there too) and call long-lived actors instead of computing in their own process:

- ``Replica``: a named, detached actor (``max_restarts=-1``, ``max_task_retries=-1``, ``num_gpus`` =
  ``gpus_per_replica``) holding a workspace of the run (``workspace.py``) in its own process: reader, resident or
  streamed search model, teacher shards, and for replica 0 the supernet build's layer cursor, spread over the
  actor's GPUs when it has several (``gpus_per_replica`` > 1: the windows dealt out to them a chunk at a time, a
  layer's prunes run on all of them, with the bits of one GPU). A resumed flow run finds its replicas again by
  name; a replica that dies is restarted by Ray and the call it was running is sent again, and rebuilds what it
  held from the store (the build replays committed layers, as a fresh worker does).
- ``RayPoolEvaluator``: the search's evaluator (``__call__`` and ``pool``, what ``search.select`` calls). A unit is
  one candidate on one shard of whole evaluation batches; the driver adds the per-batch (KL sum, tokens) back in
  window order, the float sequence of ``KLEvaluator.pool``, so the fitness has the same bits for any number of
  replicas.

Ray is an optional extra (``pip install tyr[ray]``) imported only here, and only when a run asks for it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tyr_core.config import ExecutionConfig
from tyr_core.errors import ConfigError, SearchError

from .workspace import RunRef

if TYPE_CHECKING:
    from ray.actor import ActorHandle

log = logging.getLogger(__name__)

NAMESPACE = "tyr"
BUILD_REPLICA = 0  # the replica that owns the supernet build's layer cursor

_GUARD = threading.Lock()
_REQUESTED: dict[RunRef, tuple[ExecutionConfig, int | None]] = {}  # run -> (execution, torch_threads) asked for
_ENGINES: dict[RunRef, RayEngine] = {}
_LOCAL_CLUSTER = {"started": False}  # this process started a local cluster for its command


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("execution.engine=ray needs Ray: pip install 'tyr[ray]'") from None
    return ray


class Replica:
    """One actor of a run: its own process, its own workspace of the run, its share of the devices."""

    def __init__(self, ref: RunRef, torch_threads: int | None):
        import torch

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.ref = ref
        self.units = 0
        self.build_steps = 0
        self.gpus = len(_ray().get_gpu_ids())  # the GPUs Ray assigned this actor: a build spreads over them

    def info(self) -> dict[str, Any]:
        """Where this replica runs and what it has done since it (re)started (copies it committed included)."""
        from . import worker_steps

        ray = _ray()
        return {
            "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(),
            "units": self.units,
            "build_steps": self.build_steps,
            "gpus": self.gpus,
            "committed": list(worker_steps.COMMITTED_HERE),
        }

    def build(self, step: str, *args, driver_token: str | None = None) -> Any:
        """One build step (``layer_stats``, ``local_prune``, ``accumulate``, ``end_build``) in this process, for the
        driver holding the run's lock with ``driver_token``: the step's commits check that it still does."""
        from . import worker_steps

        if step not in {"layer_stats", "local_prune", "accumulate", "end_build"}:
            raise ValueError(f"unknown build step {step!r}")
        from .lock import work_for
        from .workspace import workspace

        ws = workspace(self.ref)
        if driver_token is not None:
            work_for(ws.store.url, driver_token)
        ws.build_gpus = max(1, self.gpus)
        self.build_steps += 1
        return getattr(worker_steps, step)(self.ref, *args)

    def search_terms(
        self, iteration: int, reference: list[int], groups: Sequence[tuple[list[int], Sequence[list[int]]]], units: int
    ) -> list[list[tuple[float, int]]]:
        """``worker_steps.search_terms`` in this process; ``units`` (candidate, shard) pairs are counted."""
        from . import worker_steps

        out = worker_steps.search_terms(self.ref, iteration, reference, groups)
        self.units += units
        return out

    def release(self) -> None:
        """Free this replica's models and activations (the run ends; the actor is killed next)."""
        from .workspace import forget

        forget(self.ref)


@dataclass
class RayEngine:
    """A run's replicas on a Ray cluster, created on first use and found again by name."""

    ref: RunRef
    execution: ExecutionConfig
    torch_threads: int | None
    scope: str  # the run's id, store and incarnation: actors of another run, or of a redone run, never match
    _actors: dict[int, ActorHandle] = field(default_factory=dict)

    def name(self, index: int) -> str:
        return f"{self.scope}-replica-{index}"

    def actor(self, index: int) -> ActorHandle:
        """Replica ``index``: the live actor of that name, or a new one."""
        if index not in self._actors:
            ray = _ray()
            cls = ray.remote(concurrency_groups={"info": 1})(Replica)  # info() answers while a step runs
            self._actors[index] = cls.options(
                name=self.name(index),
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=-1,
                max_task_retries=-1,
                num_cpus=1,
                num_gpus=self.execution.gpus_per_replica,
                scheduling_strategy="SPREAD",
            ).remote(self.ref, self.torch_threads)
        return self._actors[index]

    def replicas(self) -> list[ActorHandle]:
        return [self.actor(i) for i in range(self.execution.replicas)]

    def build(self, step: str, *args) -> Any:
        """A build step on the build replica, which owns the layer cursor across the layer's steps; it writes only
        while this process holds the run's lock."""
        from .lock import driver_token
        from .workspace import workspace

        token = driver_token(workspace(self.ref).store.url)
        return _ray().get(self.actor(BUILD_REPLICA).build.remote(step, *args, driver_token=token))

    def get(self, refs: list) -> list:
        """The answers of actor calls, in order (waits; a call to a replica that died is sent again by Ray)."""
        return _ray().get(refs)

    def info(self) -> list[dict[str, Any]]:
        ray = _ray()
        return ray.get([a.info.options(concurrency_group="info").remote() for a in self.replicas()])

    def evaluator(self, iteration: int, reference: list[int], batch_size: int = 4) -> RayPoolEvaluator:
        return RayPoolEvaluator(self, iteration, list(reference), batch_size)

    def release(self) -> None:
        """Kill the run's actors (their memory and devices go back to the cluster)."""
        ray = _ray()
        for i in range(self.execution.replicas):
            try:
                actor = ray.get_actor(self.name(i), namespace=NAMESPACE)
            except ValueError:  # never created, or already gone
                continue
            ray.kill(actor, no_restart=True)
        self._actors = {}


def shards(batches: Sequence[list[int]], count: int) -> list[list[list[int]]]:
    """``batches`` cut into ``count`` contiguous shards of whole batches, in order (sizes differ by one at most)."""
    count = max(1, min(count, len(batches)))
    size, extra = divmod(len(batches), count)
    out, start = [], 0
    for s in range(count):
        end = start + size + (1 if s < extra else 0)
        out.append(list(batches[start:end]))
        start = end
    return out


class RayPoolEvaluator:
    """The search's fitness on the run's replicas, with the bits of ``KLEvaluator.pool``.

    The pool's windows are cut into batches exactly as ``KLEvaluator.pool`` cuts them, the batches into one shard per
    replica (at most), and the work into units of one candidate on one shard. Unit ``u`` (candidate ``u // S``,
    shard ``u % S``) goes to replica ``u % R``: with as many shards as replicas each replica scores every candidate
    on its own shard, batch-major; with one batch the candidates are spread. Each replica gets one call per pool.
    """

    def __init__(self, engine: RayEngine, iteration: int, reference: list[int], batch_size: int = 4):
        self.engine, self.iteration, self.reference, self.batch_size = engine, iteration, reference, batch_size
        self.units_sent: dict[int, int] = {}

    def __call__(self, levels: list[int], window_ids: list[int]) -> float:
        return self.pool([levels], window_ids)[0]

    def pool(self, candidates: Sequence[list[int]], window_ids: list[int]) -> list[float]:
        if not window_ids:
            raise SearchError("a candidate must be scored on at least one window")
        batches = [list(window_ids[i : i + self.batch_size]) for i in range(0, len(window_ids), self.batch_size)]
        replicas = self.engine.replicas()
        parts = shards(batches, len(replicas))
        per_replica: dict[int, list[tuple[int, int]]] = {}  # replica -> [(candidate, shard)]
        for u in range(len(candidates) * len(parts)):
            per_replica.setdefault(u % len(replicas), []).append(divmod(u, len(parts)))
        calls = {}
        for r, units in per_replica.items():
            groups, order = [], []  # batch-major within the replica: every batch of its shards, its candidates
            for s in sorted({s for _, s in units}):
                members = [j for j, s2 in units if s2 == s]
                for b, batch in enumerate(parts[s]):
                    groups.append((batch, [list(candidates[j]) for j in members]))
                    order.append((s, b, members))
            ref = replicas[r].search_terms.remote(self.iteration, self.reference, groups, len(units))
            calls[r] = (ref, order)
            self.units_sent[r] = self.units_sent.get(r, 0) + len(units)
        terms: dict[tuple[int, int, int], tuple[float, int]] = {}  # (candidate, shard, batch) -> (KL sum, tokens)
        answers = self.engine.get([ref for ref, _ in calls.values()])
        for (_, order), answer in zip(calls.values(), answers, strict=True):
            for (s, b, members), group_terms in zip(order, answer, strict=True):
                for j, term in zip(members, group_terms, strict=True):
                    terms[(j, s, b)] = term
        totals, tokens = [0.0] * len(candidates), [0] * len(candidates)
        for s, part in enumerate(parts):  # window order: the float sequence of KLEvaluator.pool
            for b in range(len(part)):
                for j in range(len(candidates)):
                    kl, n = terms[(j, s, b)]
                    totals[j], tokens[j] = totals[j] + kl, tokens[j] + n
        return [t / n for t, n in zip(totals, tokens, strict=True)]


# --- which runs of this process use Ray --------------------------------------------------------------------------


def request(ref: RunRef, execution: ExecutionConfig, torch_threads: int | None = None) -> None:
    """The run opened in this process asks for ``execution``; nothing starts until a step needs an actor."""
    with _GUARD:
        if execution.engine == "ray":
            _REQUESTED[ref] = (execution, torch_threads)
        else:
            _REQUESTED.pop(ref, None)


def engine_for(ref: RunRef) -> RayEngine | None:
    """The run's Ray engine (connecting to, or starting, the cluster on first use), or None for a local run."""
    with _GUARD:
        if ref not in _REQUESTED:
            return None
        if ref not in _ENGINES:
            from .workspace import cache_scope

            execution, threads = _REQUESTED[ref]
            connect(execution)
            _ENGINES[ref] = RayEngine(ref, execution, threads, cache_scope(ref))
        return _ENGINES[ref]


def connect(execution: ExecutionConfig) -> None:
    """Join ``execution.address`` (else ``RAY_ADDRESS``), or start a local cluster on loopback (stopped by
    ``release``); a process already connected stays as it is."""
    ray = _ray()
    if ray.is_initialized():
        return
    address = execution.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        return
    ray.init(
        address="local",  # a new cluster, never one another process started on this host
        namespace=NAMESPACE,
        num_cpus=execution.replicas,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
    )
    _LOCAL_CLUSTER["started"] = True


def release(ref: RunRef) -> None:
    """The run ends in this process: kill its actors, and stop the local cluster if this process started it."""
    with _GUARD:
        _REQUESTED.pop(ref, None)
        engine = _ENGINES.pop(ref, None)
        if engine is not None:
            try:
                engine.release()
            except Exception as err:  # the cluster went away: nothing left to free
                log.warning("could not release the run's Ray actors: %s", err)
        if _LOCAL_CLUSTER["started"] and not _ENGINES:
            _ray().shutdown()
            _LOCAL_CLUSTER["started"] = False
