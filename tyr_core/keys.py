"""Every artefact key of a run, built here and nowhere else. Keys are relative to the run's prefix
(``runs/<run_id>/``) and use '/' separators; every committed artefact has a manifest at ``manifest_key(key)``, which
names the object that holds its bytes (``object_key(key, sha256)``; runs committed before that kept them at ``key``).

Layout::

    run.json, lock.json
    calibration/{tokens,heldout}.safetensors
    teacher/topk-NNNNN.safetensors, teacher/index.json
    iter-K/plan.json, iter-K/stats/layer-L.safetensors
    iter-K/supernet/layer-L/{attn,mlp}/level±S.safetensors, iter-K/supernet/index.json
    iter-K/search/scan.json, iter-K/search/gen-G.json, iter-K/result.json
    reports/baselines.json, reports/final-K.json
    final/<format>/..., final/<format>/files.json (written last)
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["attn", "mlp"]
KINDS: tuple[Kind, Kind] = ("attn", "mlp")

RUNS_ROOT = "runs/"  # under a store's base URL, one prefix per run id
RUN_CONFIG = "run.json"  # the run's config, artefact hash and incarnation; committed when the run is created
LOCK_KEY = "lock.json"  # the live process that drives the run (conditional create, never committed)
MANIFEST_SUFFIX = ".manifest.json"  # appended to a key: the manifest that commits it
EXPORT_MARKER = "files.json"  # the file list of one export format, committed after every file it lists


def run_prefix(run_id: str) -> str:
    """Prefix of one run's keys under a store's base URL; every key below is relative to it."""
    return f"{RUNS_ROOT}{run_id}/"


def manifest_key(key: str) -> str:
    """Key of the manifest (sha256, size, config hash) that commits ``key``."""
    return key + MANIFEST_SUFFIX


def object_key(key: str, sha256: str) -> str:
    """Where a commit stores ``key``'s bytes: named by their content, so a committed object is never overwritten with
    other bytes (a second writer's differ, so they go elsewhere). The manifest names it."""
    return f"{key}.{sha256[:24]}"


def is_manifest(key: str) -> bool:
    return key.endswith(MANIFEST_SUFFIX)


def manifest_target(key: str) -> str:
    """The artefact key a manifest key commits (the inverse of ``manifest_key``)."""
    if not is_manifest(key):
        raise ValueError(f"{key!r} is not a manifest key (it does not end with {MANIFEST_SUFFIX!r})")
    return key[: -len(MANIFEST_SUFFIX)]


def probe_key(token: str) -> str:
    """A short-lived key the store check writes and deletes to prove conditional creates work."""
    return f"probes/{token}.json"


# --- calibration and teacher ----------------------------------------------------------------------------------


def calibration_key(name: str = "tokens") -> str:
    """Tokenised windows: ``tokens`` (calibration) or ``heldout`` (evaluation)."""
    return f"calibration/{name}.safetensors"


def teacher_key(shard: int) -> str:
    """Teacher top-k logits (fp16 values, int32 ids), one shard of calibration windows."""
    return teacher_file_key(f"topk-{shard:05d}.safetensors")


def teacher_file_key(name: str) -> str:
    """A file of the teacher cache by its name in that cache (a shard, or the index)."""
    return f"teacher/{name}"


def teacher_index_key() -> str:
    return teacher_file_key("index.json")


# --- one iteration --------------------------------------------------------------------------------------------


def iteration_prefix(iteration: int) -> str:
    return f"iter-{iteration}/"


def plan_key(iteration: int) -> str:
    """Centres and level grids of every sublayer in one iteration."""
    return f"iter-{iteration}/plan.json"


def stats_prefix(iteration: int) -> str:
    return f"iter-{iteration}/stats/"


def stats_key(iteration: int, layer: int) -> str:
    return f"{stats_prefix(iteration)}layer-{layer}.safetensors"


def supernet_prefix(iteration: int) -> str:
    return f"iter-{iteration}/supernet/"


def copy_key(iteration: int, layer: int, kind: Kind, level: int) -> str:
    """A compact pruned copy of one sublayer at one level of the supernet grid."""
    return f"{supernet_prefix(iteration)}layer-{layer}/{kind}/level{level:+d}.safetensors"


def supernet_index_key(iteration: int) -> str:
    """The checksummed index of every copy: what defines the search space."""
    return f"{supernet_prefix(iteration)}index.json"


def search_state_key(iteration: int, generation: int) -> str:
    """The search after one generation (parent, fitness, history, RNG state)."""
    return f"iter-{iteration}/search/gen-{generation}.json"


def sensitivity_key(iteration: int) -> str:
    """The sensitivity scan before the iteration's first generation (one-level moves per gene and their cost)."""
    return f"iter-{iteration}/search/scan.json"


def result_key(iteration: int) -> str:
    """The iteration's winner: levels, sparsities and the next centres."""
    return f"iter-{iteration}/result.json"


# --- reports and exports --------------------------------------------------------------------------------------


def report_key(name: str) -> str:
    """Evaluation reports as JSON."""
    return f"reports/{name}.json"


def baselines_report_key() -> str:
    """Dense, uniform and magnitude perplexity and parameters (after iteration 1)."""
    return report_key("baselines")


def final_report_key(iteration: int) -> str:
    """The searched model's evaluation after its last iteration: once committed, the run is complete."""
    return report_key(f"final-{iteration}")


def final_key(name: str) -> str:
    return f"final/{name}"


def export_prefix(fmt: str) -> str:
    """Folder of one exported model format under ``final/``."""
    return final_key(f"{fmt}/")


def export_file_key(fmt: str, name: str) -> str:
    """One file of an export, by its path inside the exported folder."""
    return export_prefix(fmt) + name


def export_marker_key(fmt: str) -> str:
    """The export's file list, committed last: an export is complete once it is."""
    return export_file_key(fmt, EXPORT_MARKER)


def sublayer_name(layer: int, kind: Kind) -> str:
    """HF module path of a prunable sublayer, the name users see in reports."""
    return f"model.layers.{layer}.{'self_attn' if kind == 'attn' else 'mlp'}"
