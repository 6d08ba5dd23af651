"""``tyr prune ... --dry-run``: the resolved config, the groups and the sparsity reachable in whole groups, and
estimates of time, peak memory and disk from counts of parameters, tokens and copies (labelled as estimates)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import yaml

from .common import human_bytes, out_console, print_json

if TYPE_CHECKING:
    from tyr_core.config import RunConfig

    from .location import StoreLocation

# Assumed sustained fp32 throughput of a forward pass, for the time estimate only: per CPU core, and per GPU.
CPU_FLOPS_PER_CORE = 15e9
GPU_FLOPS = 30e12
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def build_plan(config: RunConfig, run_id: str, location: StoreLocation | None) -> dict[str, Any]:
    """What the run would do and cost, computed from the model's config.json and the run config; loads no weights."""
    import torch

    from tyr_core.families import geometry, load_config, resolve_model
    from tyr_core.pipeline import initial_centres

    folder = resolve_model(config.model.source, revision=config.model.revision)
    hf = load_config(folder, config.model.trust_remote_code)
    geo = geometry(hf)
    centres = initial_centres(geo, config.prune)
    groups, dense, pruned = {}, 0, 0
    for kind, removed in centres.items():
        total = geo.groups(kind) * geo.num_layers
        groups[kind] = {
            "per_layer": geo.groups(kind),
            "layers": geo.num_layers,
            "removed": sum(removed),
            "reachable_sparsity": round(sum(removed) / total, 6),
        }
        for r in removed:
            dense += geo.sublayer_params(kind, torch.arange(geo.groups(kind)))
            pruned += geo.sublayer_params(kind, torch.arange(geo.groups(kind) - r))
    embed = hf.vocab_size * geo.hidden * (1 if getattr(hf, "tie_word_embeddings", False) else 2)
    width = DTYPE_BYTES[config.model.dtype]
    return {
        "run_id": run_id,
        "store": location.url if location else "the embedded SeaweedFS (started for the command)",
        "model_folder": str(folder),
        "config": config.model_dump(mode="json"),
        "target_sparsity": config.prune.target_sparsity,
        "groups": groups,
        "decoder_params": {"dense": dense, "pruned_uniform": pruned, "removed_fraction": round(1 - pruned / dense, 4)},
        "estimates": _estimates(config, dense, pruned, embed, geo.hidden, width),
    }


def _estimates(config: RunConfig, dense: int, pruned: int, embed: int, hidden: int, width: int) -> dict[str, Any]:
    """Order-of-magnitude figures: forward FLOPs over an assumed throughput, the largest resident tensors, and the
    stored copies. Measured times and memory are in docs/benchmarks.md."""
    import torch

    cal, search, prune, teacher = config.calibration, config.search, config.prune, config.teacher
    gpu = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    flops_per_s = GPU_FLOPS if gpu else CPU_FLOPS_PER_CORE * (config.torch_threads or os.cpu_count() or 1)
    calib_tokens = cal.num_windows * cal.seq_len
    pools = [search.offspring, *search.survivors[:-1]]
    search_tokens = sum(p * t for p, t in zip(pools, search.stage_tokens, strict=False))
    search_flops = prune.iterations * search.generations * search_tokens * 2 * (pruned + embed)
    # Each iteration runs the calibration tokens through every level of every sublayer (statistics, then the copies).
    build_flops = prune.iterations * calib_tokens * 2 * dense * (1 + prune.num_levels)
    teacher_windows = teacher.max_windows or (cal.validation_windows or cal.num_windows)
    teacher_flops = (cal.num_windows + teacher_windows) * cal.seq_len * 2 * (dense + embed)
    seconds = (search_flops + build_flops + teacher_flops) / flops_per_s
    activations = min(2 * calib_tokens * hidden * 4, prune.activation_memory_mb << 20)
    model_bytes = (dense + embed) * width
    supernet = prune.num_levels * dense * (1 - prune.target_sparsity) * width
    teacher_bytes = teacher_windows * cal.seq_len * min(teacher.topk, 1 << 30) * 6  # fp16 value + int32 index
    disk = supernet * (config.keep_last + 1) + teacher_bytes + (pruned + embed) * width * len(config.export.formats)
    return {
        "label": "estimates from parameter, token and copy counts, not measurements (docs/benchmarks.md has those)",
        "wall_seconds": round(seconds),
        "assumed_flops_per_second": flops_per_s,
        "peak_memory_bytes": int(model_bytes * 2 + activations),
        "disk_bytes": int(disk),
        "search_tokens_scored": prune.iterations * search.generations * search_tokens,
    }


def print_plan(config: RunConfig, run_id: str, location: StoreLocation | None, as_json: bool = False) -> None:
    plan = build_plan(config, run_id, location)
    if as_json:
        print_json(plan)
        return
    out_console.print("[bold]resolved config[/bold] (nothing was started)", highlight=False)
    out_console.print(yaml.safe_dump(plan["config"], sort_keys=False).rstrip(), highlight=False, markup=False)
    out_console.print(f"run id: {run_id}; store: {plan['store']}", highlight=False)
    for kind, g in plan["groups"].items():
        out_console.print(
            f"{kind}: {g['per_layer']} groups x {g['layers']} layers; {g['removed']} removed: reachable sparsity "
            f"{g['reachable_sparsity']:.4f} (target {plan['target_sparsity']})",
            highlight=False,
        )
    params = plan["decoder_params"]
    out_console.print(
        f"decoder parameters: {params['dense']:,} -> about {params['pruned_uniform']:,} "
        f"({params['removed_fraction']:.1%} removed at the uniform start)",
        highlight=False,
    )
    est = plan["estimates"]
    out_console.print(
        f"estimated (not measured): wall time ~{_duration(est['wall_seconds'])}, peak memory "
        f"~{human_bytes(est['peak_memory_bytes'])}, disk ~{human_bytes(est['disk_bytes'])}",
        highlight=False,
    )
    out_console.print(f"  {est['label']}", highlight=False)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
