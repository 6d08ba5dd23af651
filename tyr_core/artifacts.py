"""The one place that builds artefact keys. Keys are relative to a run's prefix and use '/' separators.

Layout (ARCHITECTURE.md): run.json, calibration/, teacher/, iter-K/plan.json, iter-K/stats/layer-L.safetensors,
iter-K/supernet/layer-L/{attn,mlp}/level±S.safetensors, iter-K/supernet/index.json, iter-K/search/gen-G.json,
iter-K/result.json, final/... . Every committed object has a manifest at ``manifest_key(key)``.
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["attn", "mlp"]
KINDS: tuple[Kind, Kind] = ("attn", "mlp")

RUN_CONFIG = "run.json"
MANIFEST_SUFFIX = ".manifest.json"
LOCK_KEY = "lock.json"


def manifest_key(key: str) -> str:
    """Key of the manifest (sha256, size, config hash) that commits ``key``."""
    return key + MANIFEST_SUFFIX


def is_manifest(key: str) -> bool:
    return key.endswith(MANIFEST_SUFFIX)


def calibration_key(name: str = "tokens") -> str:
    return f"calibration/{name}.safetensors"


def teacher_key(shard: int) -> str:
    """Teacher top-k logits (fp16 values, int32 ids), one shard of calibration windows."""
    return f"teacher/topk-{shard:05d}.safetensors"


def teacher_index_key() -> str:
    return "teacher/index.json"


def iteration_prefix(iteration: int) -> str:
    return f"iter-{iteration}/"


def plan_key(iteration: int) -> str:
    return f"iter-{iteration}/plan.json"


def stats_key(iteration: int, layer: int) -> str:
    return f"iter-{iteration}/stats/layer-{layer}.safetensors"


def copy_key(iteration: int, layer: int, kind: Kind, level: int) -> str:
    """A compact pruned copy of one sublayer at one level of the supernet grid."""
    return f"iter-{iteration}/supernet/layer-{layer}/{kind}/level{level:+d}.safetensors"


def supernet_index_key(iteration: int) -> str:
    return f"iter-{iteration}/supernet/index.json"


def search_state_key(iteration: int, generation: int) -> str:
    return f"iter-{iteration}/search/gen-{generation}.json"


def result_key(iteration: int) -> str:
    return f"iter-{iteration}/result.json"


def final_key(name: str) -> str:
    return f"final/{name}"


def sublayer_name(layer: int, kind: Kind) -> str:
    """HF module path of a prunable sublayer, the name users see in reports."""
    return f"model.layers.{layer}.{'self_attn' if kind == 'attn' else 'mlp'}"


def report_key(name: str) -> str:
    """Evaluation reports (baselines, final) as JSON."""
    return f"reports/{name}.json"


def export_prefix(fmt: str) -> str:
    """Folder of one exported model format under ``final/``."""
    return f"final/{fmt}/"


def stats_prefix(iteration: int) -> str:
    return f"iter-{iteration}/stats/"


def supernet_prefix(iteration: int) -> str:
    return f"iter-{iteration}/supernet/"


def probe_key(token: str) -> str:
    """A short-lived key the store check writes and deletes to prove conditional creates work."""
    return f"probes/{token}.json"


def manifest_target(key: str) -> str:
    """The artefact key a manifest key commits (the inverse of ``manifest_key``)."""
    if not is_manifest(key):
        raise ValueError(f"{key!r} is not a manifest key (it does not end with {MANIFEST_SUFFIX!r})")
    return key[: -len(MANIFEST_SUFFIX)]


def run_prefix(run_id: str) -> str:
    """Prefix of one run's keys under a store's base URL; every key above is relative to it."""
    return f"runs/{run_id}/"
