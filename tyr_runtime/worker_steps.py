"""What a worker computes for the supernet build and the search, in whichever process holds the run's workspace:
the flow's own (``execution.engine=local``) or a Ray actor's (``execution.engine=ray``, ``ray_engine.py``).

Every function takes the run's ``RunRef`` and plain values and returns plain values. The build steps commit their
copies conditionally, so a step that runs twice (a retried task, a restarted actor) commits nothing twice. The
search's unit, ``search_terms``, commits nothing: the driver adds its (KL sum, tokens) up in window order.
"""

from __future__ import annotations

from collections.abc import Sequence

from tyr_core import keys
from tyr_core.fitness import KLEvaluator, TeacherTopK, make_kl_evaluator
from tyr_core.grid import Sublayer
from tyr_core.store import commit_bytes, read_json, read_manifest, remaining
from tyr_core.supernet import copy_bytes, index_entry
from tyr_core.supernet_build import LayerCursor

from .workspace import RunRef, Workspace, workspace

COMMITTED_HERE: list[str] = []  # keys of the copies this process has computed and committed, in order


def plan_sublayers(plan: dict) -> list[Sublayer]:
    return [Sublayer(**s) for s in plan["sublayers"]]


def _cursor_at(ws: Workspace, iteration: int, subs: list[Sublayer], layer: int) -> LayerCursor:
    """This process's build cursor, at ``layer``. One already past it is replaced by a fresh one that replays the
    committed layers: a build actor outlives the flow run that drove it, and a Retry drives it again from layer 0."""
    cursor = ws.cursor(iteration, subs)
    if cursor.layer > layer:
        ws.end_build()
        cursor = ws.cursor(iteration, subs)
    cursor.seek(layer, subs, lambda lyr: ws.copies(iteration, subs, lyr))
    return cursor


def _layer_copies(iteration: int, subs: list[Sublayer], layer: int) -> dict[str, tuple[Sublayer, int]]:
    """The copy keys of one layer, each with its (sublayer, level)."""
    return {keys.copy_key(iteration, layer, s.kind, lv): (s, lv) for s in subs if s.layer == layer for lv in s.levels}


def layer_stats(ref: RunRef, iteration: int, layer: int) -> dict:
    """H of o_proj and down_proj for one layer, kept in this process for the layer's local prunes; nothing when this
    process's cursor is past the layer and its copies are all committed (a Retry driving it again from layer 0).

    With several build devices the layer's copies not yet committed are computed here too, spread over the devices
    (the local-prune steps, which reach this process one at a time, then commit them)."""
    ws = workspace(ref)
    subs = plan_sublayers(ws.plan(iteration))
    requests = _layer_copies(iteration, subs, layer)
    if ws.cursor(iteration, subs).layer > layer and not remaining(ws.store, *requests):
        return {}
    cursor = _cursor_at(ws, iteration, subs, layer)
    shapes = {kind: int(h.shape[0]) for kind, h in cursor.hessians().items()}
    if len(cursor.devices) > 1:
        cursor.prune_all([requests[key] for key in remaining(ws.store, *requests)])
    return shapes


def local_prune(ref: RunRef, iteration: int, layer: int, level: int, kinds: list[str]) -> list[dict]:
    """One layer at one level: a compact copy of each sublayer in ``kinds``, each committed on its own (a copy
    committed by an earlier attempt is returned from its manifest, not recomputed); their index entries."""
    ws = workspace(ref)
    subs = plan_sublayers(ws.plan(iteration))
    entries = []
    for kind in kinds:
        key = keys.copy_key(iteration, layer, kind, level)
        if not remaining(ws.store, key):  # committed by an attempt whose result was lost (killed right after)
            manifest = read_manifest(ws.store, key)
            entries.append({**manifest.meta, "sha256": manifest.sha256})
            continue
        cursor = _cursor_at(ws, iteration, subs, layer)
        sub = next(s for s in subs if s.layer == layer and s.kind == kind)
        copy = cursor.prune(sub, level)
        data = copy_bytes(copy)
        entry = index_entry(sub, level, copy, ws.model.geometry, key, "", len(data))
        manifest = commit_bytes(ws.store, key, data, ws.config.artefact_hash(), meta=entry)  # or raises: other bytes
        ws.keep_committed_copy(key, copy)  # for this layer's accumulate
        COMMITTED_HERE.append(key)
        entries.append({**entry, "sha256": manifest.sha256})
    return entries


def accumulate(ref: RunRef, iteration: int, layer: int) -> int:
    """Advance the calibration activations past ``layer`` with its expected weights (paper eq. 5)."""
    ws = workspace(ref)
    subs = plan_sublayers(ws.plan(iteration))
    cursor = ws.cursor(iteration, subs)
    if cursor.layer <= layer + 1:  # else past it: a Retry replaying steps this process has done
        cursor.seek(layer + 1, subs, lambda lyr: ws.copies(iteration, subs, lyr))
    return cursor.layer


def end_build(ref: RunRef) -> None:
    """The supernet index is committed: free the build's activations and held copies."""
    workspace(ref).end_build()


def teacher(ws: Workspace) -> TeacherTopK:
    """The teacher's top-k, fetched into this process's cache."""
    index = read_json(ws.store, keys.teacher_index_key())
    for shard in index["shards"]:
        ws.fetch(keys.teacher_file_key(shard))
    ws.fetch(keys.teacher_index_key())
    return TeacherTopK(ws.cache / "teacher")


def search_evaluator(ref: RunRef, iteration: int, reference: list[int]) -> KLEvaluator:
    """This process's ``KLEvaluator`` over the iteration's search model, its prefix shared with ``reference``."""
    ws = workspace(ref)
    sm, forward = ws.search_model(iteration)
    teacher_ = teacher(ws)
    windows = ws.search_windows()[: teacher_.index["windows"]]
    forward.set_reference(list(reference))  # candidates share the reference's (the parent's) unchanged layers
    captured = (lambda: forward.captured) if forward.capture else None
    weight = ws.config.search.hidden_weight
    return make_kl_evaluator(sm.apply, forward.logits, windows, teacher_, hidden_weight=weight, captured=captured)


def search_terms(
    ref: RunRef, iteration: int, reference: list[int], groups: Sequence[tuple[list[int], Sequence[list[int]]]]
) -> list[list[tuple[float, int]]]:
    """(KL sum, tokens) of candidates on whole evaluation batches: ``groups`` is ``[(batch, candidates), ...]``;
    the answer has one list per group, one term per candidate, as ``KLEvaluator.batch_terms`` computes them."""
    evaluate = search_evaluator(ref, iteration, reference)
    return [evaluate.batch_terms([list(c) for c in candidates], list(batch)) for batch, candidates in groups]
