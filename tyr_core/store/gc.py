"""Garbage collection of earlier iterations' stats and supernets, manifests before objects."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .. import keys
from ..errors import ConfigError, MissingArtefactError
from .commit import is_committed, read_json
from .protocol import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcReport:
    """What one ``collect_garbage`` call removed. ``keys_deleted`` counts objects and manifests."""

    bytes_freed: int = 0
    keys_deleted: int = 0
    iterations: tuple[int, ...] = ()


def best_iteration(store: Store, last: int) -> int:
    """The iteration, up to ``last``, whose winner has the best validation fitness: the run's final model.

    Under error accumulation each iteration rebuilds its copies, so a later winner can be worse than an earlier
    one. Ties and results without a validation fitness go to the later iteration.
    """
    best, best_fitness = last, None
    for iteration in range(last, 0, -1):
        if not is_committed(store, keys.result_key(iteration)):
            continue
        fitness = read_json(store, keys.result_key(iteration)).get("validation_fitness")
        if fitness is not None and (best_fitness is None or fitness < best_fitness):
            best, best_fitness = iteration, fitness
    return best


def collect_garbage(store: Store, current_iteration: int, keep_last: int = 1) -> GcReport:
    """Delete the stats and supernets of iterations ``K <= current_iteration - keep_last``, except the best
    iteration so far (``best_iteration``), whose supernet the final model is read from.

    Runs only once ``current_iteration``'s result is committed; search states, plans and results are kept.
    Each manifest goes before its object, so a crash mid-GC never leaves a manifest without its object, and
    calling it again finishes the job. Only keys under the store's own root or prefix are listed or deleted.

    Raises:
        ConfigError: ``keep_last`` is negative.
    """
    if keep_last < 0:
        raise ConfigError(f"keep_last must be >= 0 (iterations to keep), got {keep_last}")
    if not is_committed(store, keys.result_key(current_iteration)):
        log.info("GC skipped: the result of iteration %d is not committed yet", current_iteration)
        return GcReport()
    freed = deleted = 0
    best = best_iteration(store, current_iteration)  # an earlier best outlives keep_last; the current one follows it
    collected = tuple(i for i in range(1, current_iteration - keep_last + 1) if i != best or i == current_iteration)
    for iteration in collected:
        for prefix in (keys.stats_prefix(iteration), keys.supernet_prefix(iteration)):
            f, d = _delete_prefix(store, prefix)
            freed, deleted = freed + f, deleted + d
    log.info("GC of iterations %s: %d keys, %d bytes freed", list(collected), deleted, freed)
    return GcReport(bytes_freed=freed, keys_deleted=deleted, iterations=collected)


def _delete_prefix(store: Store, prefix: str) -> tuple[int, int]:
    """Delete every key under ``prefix``, every manifest before any object; returns (bytes freed, keys deleted)."""
    listed = store.list(prefix)
    manifests = [key for key in listed if keys.is_manifest(key)]
    objects = [key for key in listed if not keys.is_manifest(key)]
    freed = sum(_size_or_zero(store, key) for key in objects)
    for key in [*manifests, *objects]:  # a crash in between leaves objects without manifests, never the reverse
        store.delete(key)
    return freed, len(manifests) + len(objects)


def _size_or_zero(store: Store, key: str) -> int:
    try:
        return store.size(key)
    except MissingArtefactError:  # deleted since the listing (another GC): nothing to free
        return 0
