"""What every task shares: which failures are retried, and the cache key that makes a task's result the run's.

Whether an artefact is still to be computed is decided by ``tyr_core.store.remaining``: a task computes it through
``commit_once`` (new flow runs of the same run id recompute nothing committed), and the cache key below is the same
answer as Prefect sees it: task results are persisted under the run (id, store, incarnation) + artefact key, so the
UI's Retry of the same flow run shows finished tasks as ``Cached``.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prefect.serializers import JSONSerializer

from tyr_core.errors import InvalidKeyError, NoSuchBucketError, StoreCredentialsError, StoreError, TyrError
from tyr_core.store import remaining
from tyr_runtime.results import install_result_guard
from tyr_runtime.workspace import RunRef, cache_scope, workspace

if TYPE_CHECKING:
    from prefect import Task
    from prefect.client.schemas.objects import State, TaskRun

CODE_VERSION = "2"  # 2: JSON results (1 pickled them). Bump when a task's output for the same key changes meaning


def _transient(_task: Task[..., Any], _task_run: TaskRun, state: State) -> bool:
    """Retry storage and device hiccups, never tyr's own errors (bad input, corrupt artefact, refusal)."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the failure's details could not be read: retry is the safe choice
        return True
    permanent = (InvalidKeyError, StoreCredentialsError, NoSuchBucketError)
    return not isinstance(error, TyrError) or (isinstance(error, StoreError) and not isinstance(error, permanent))


# Task results are persisted as plain JSON (the tasks return small dicts and lists), never as pickles: result storage
# can sit in a bucket beside the artefacts, and a pickle read back from it at the next Retry would run its code. No
# object decoder: a result read back never names a class to import.
RESULT_SERIALIZER = JSONSerializer(object_decoder=None)
# Prefect reads a record back with the serializer the record names, not this one: refuse any other before decoding
install_result_guard()
JSON_RESULTS = dict(result_serializer=RESULT_SERIALIZER)

IO_RETRIES = dict(
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_jitter_factor=0.5,
    retry_condition_fn=_transient,
    **JSON_RESULTS,
)


# the result is stored under its cache key, as a file name (at most 255 bytes) or an object key
MAX_CACHE_KEY_CHARS = 200


def artefact_cache_key(
    key_fn: Callable[[dict[str, Any]], str | list[str]],
) -> Callable[[Any, dict[str, Any]], str]:
    """Cache key = run (id, store, incarnation) + the task's artefact keys (``key_fn``: one, a list, or an export
    prefix): stable across Retry of the same flow run and across new flow runs of the run, never shared with another
    store's run of that id or a deleted run's."""

    def cache_key(context: Any, params: dict[str, Any]) -> str:
        found = key_fn(params)
        artefacts = [found] if isinstance(found, str) else found
        named = ",".join(artefacts).replace("/", "_")  # no artefact key holds a ','; '+' is in positive levels' keys
        scope = f"tyr-{CODE_VERSION}-{cache_scope(params['ref'])}"
        base = f"{scope}-{named}"
        if len(base) > MAX_CACHE_KEY_CHARS:  # a layer's many copy keys: their digest, not a file name too long
            base = f"{scope}-{hashlib.sha256(named.encode()).hexdigest()}"
        if is_committed_all(params["ref"], artefacts) or not _has_result(context, base):
            return base  # committed (Retry: Cached), or never computed (its result is stored under this key)
        # a result is cached but the artefact is gone (deleted, e.g. after it was found corrupt): compute it again
        return f"{base}-redo-{uuid.uuid4().hex}"

    return cache_key


def _has_result(context: Any, key: str) -> bool:
    store = getattr(context, "result_store", None)
    try:
        return bool(store is not None and store.exists(key))
    except Exception:  # an unreadable result storage: computing again is the safe answer
        return True


def is_committed_all(ref: RunRef, artefacts: list[str]) -> bool:
    """Whether every artefact a task's cache key names (artefact keys, or an export prefix) is committed."""
    return not remaining(workspace(ref).store, *artefacts)
