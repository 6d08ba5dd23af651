"""Glue between the configuration and the algorithm: calibration windows, per-iteration plans, baselines.

Each function takes the config section it needs and returns values; the Prefect tasks and the benches call these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from .budget import ParamBudget, budget_from_index, params_centres
from .calibration import iter_pieces, join_pieces, packed_windows, reference_chunks, tokenize_pieces
from .config import CalibrationConfig, PruneConfig, RunConfig
from .device import configure_numerics, memory_budget, resolve_device
from .errors import CalibrationError, ConfigError
from .families import Geometry
from .fitness import Captured, LogitsFn, TeacherTopK
from .grid import Sublayer, build_sublayers, recentre, uniform_centres
from .keys import KINDS, Kind
from .layerwise import LayerwiseModel
from .local_prune import magnitude_prune
from .prefix import PrefixForward
from .streaming import BlockStreamer, weight_bytes
from .sublayer_layout import PrunedLayout, scatter_columns
from .supernet import SupernetModel, SupernetReader, output_linear
from .supernet_build import Progress, PruneSettings, SupernetBuild, build_supernet

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def calibration_windows(cfg: CalibrationConfig, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """``(N, seq_len)`` calibration token ids, no BOS.

    ``packed``: documents joined by EOS, non-overlapping windows, seeded shuffle, first N. ``reference``: the
    reference's per-document pieces (tails kept) for ``N * seq_len`` tokens; pieces shorter than ``seq_len`` are
    dropped, because the layer-wise executor batches
    fixed-length windows (recorded as a deviation in docs/algorithm.md).
    """
    pieces = iter_pieces(cfg.files, cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field, cfg.data_files)
    token_pieces = tokenize_pieces(tokenizer, pieces)
    if cfg.chunking == "packed":
        sep = tokenizer.eos_token_id
        stream = (ids + [sep] if last and sep is not None else ids for ids, last in token_pieces)
        return packed_windows(stream, cfg.seq_len, cfg.num_windows, cfg.seed, sep=None)
    num_tokens = cfg.num_windows * cfg.seq_len
    chunks = reference_chunks(join_pieces(token_pieces, num_tokens), cfg.seq_len, num_tokens)
    whole = [c for c in chunks if c.numel() == cfg.seq_len]
    if not whole:
        raise CalibrationError(f"no calibration document is at least seq_len={cfg.seq_len} tokens long")
    return torch.stack(whole)


def calibration_split(cfg: CalibrationConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """``(refit windows, validation windows)``: the copies are refitted on the first, the search scores the second.

    Both come from one draw of ``num_windows + validation_windows`` windows, so the refit windows are the same as
    without a validation split. With ``validation_windows=0`` the search scores the refit windows themselves.

    Raises:
        CalibrationError: if the text holds too few windows for a disjoint validation split.
    """
    if cfg.validation_windows == 0:
        windows = calibration_windows(cfg, tokenizer)
        return windows, windows
    total = cfg.num_windows + cfg.validation_windows
    windows = calibration_windows(cfg.model_copy(update={"num_windows": total}), tokenizer)
    if windows.shape[0] <= cfg.num_windows:
        raise CalibrationError(
            f"the calibration text holds {windows.shape[0]} windows of {cfg.seq_len} tokens: too few for "
            f"calibration.num_windows={cfg.num_windows} plus a disjoint validation split; lower "
            "calibration.validation_windows or num_windows, or add text"
        )
    return windows[: cfg.num_windows], windows[cfg.num_windows :]


@dataclass(frozen=True)
class Placement:
    """Where a run computes and how much device memory it may plan to use (0 on the CPU)."""

    device: torch.device
    budget_bytes: int

    @property
    def on_gpu(self) -> bool:
        return self.device.type != "cpu"


def placement(cfg: RunConfig) -> Placement:
    """The run's device (``device``), its numerics pinned (``deterministic``), and its memory budget."""
    device = resolve_device(cfg.device)
    configure_numerics(device, cfg.deterministic)
    budget = cfg.device_memory_mb << 20 if cfg.device_memory_mb else memory_budget(device)
    return Placement(device, budget if device.type != "cpu" else 0)


def check_fits(lm: LayerwiseModel, cfg: RunConfig, where: Placement) -> None:
    """Refuse, before any work, a run whose smallest working set does not fit the device.

    The least a GPU must hold is two decoder blocks (one computing, the next arriving), the embeddings, the LM
    head, one build batch's MLP intermediates and one scoring batch's logits (4 windows, as the teacher and the
    fitness score them); everything else streams or spills.

    Raises:
        ConfigError: naming the settings to change.
    """
    if not where.on_gpu:
        return
    skeleton = lm.skeleton
    block = weight_bytes(skeleton.model.layers[0])
    ends = weight_bytes(skeleton.model.embed_tokens) + weight_bytes(skeleton.lm_head)
    element = torch.finfo(lm.dtype).bits // 8
    seq_len = cfg.calibration.seq_len
    intermediates = cfg.prune.batch_size * seq_len * lm.geometry.intermediate * element * 4  # gate, up, act, product
    logits = 4 * seq_len * lm.config.vocab_size * (element + 4)  # the logits, and one window's fp32 copy at most
    need = 2 * block + ends + intermediates + logits
    if need > where.budget_bytes:
        raise ConfigError(
            f"this model needs at least {need / 2**30:.1f} GiB of device memory (two decoder blocks, embeddings, "
            f"LM head, one batch), but device_memory_mb allows {where.budget_bytes / 2**30:.1f} GiB on "
            f"{where.device}: raise device_memory_mb, lower prune.batch_size or calibration.seq_len, or use "
            "device=cpu"
        )


def resident_or_streamed(
    model: nn.Module, sublayers: list[Sublayer], where: Placement, prefix_budget: int
) -> PrefixForward:
    """The search's forward: the whole model on the device when its weights fit half the budget, else decoder
    blocks streamed through it (``BlockStreamer``); on the CPU the model stays where it is."""
    if where.on_gpu and weight_bytes(model) > where.budget_bytes // 2:
        return PrefixForward(model, sublayers, prefix_budget, BlockStreamer(model, where.device))
    model.to(where.device)
    return PrefixForward(model, sublayers, prefix_budget)


def teacher_forward(model: nn.Module, where: Placement, hidden_layers: list[int]) -> tuple[LogitsFn, Captured | None]:
    """The dense model's ``input_ids -> logits`` for the teacher cache (resident on the device, or its blocks
    streamed through it), and with ``hidden_layers`` a callable giving those layers' outputs of the last forward."""
    forward = resident_or_streamed(model, [], where, 0)
    if forward.streamer is None and not hidden_layers:
        return (lambda ids: model(ids.to(where.device)).logits), None
    forward.capture = tuple(hidden_layers)
    captured = (lambda: forward.captured) if hidden_layers else None
    return (lambda ids: forward.logits(ids, [])), captured


def prune_settings(cfg: PruneConfig, spill_dir: Path | None = None, device_budget_bytes: int = 0) -> PruneSettings:
    return PruneSettings(
        device_budget_bytes=device_budget_bytes,
        damping=cfg.damping,
        attn_rounds=cfg.attn_rounds,
        mlp_rounds=cfg.mlp_rounds,
        accumulation=cfg.accumulation,
        refit_target=cfg.refit_target,
        first_order=cfg.first_order,
        mlp_after_attention=cfg.mlp_after_attention,
        batch_size=cfg.batch_size,
        activation_budget_bytes=cfg.activation_memory_mb << 20,
        spill_dir=spill_dir,
    )


def group_units(geo: Geometry, cfg: PruneConfig, attention: str = "heads") -> dict[Kind, int]:
    """Groups every width of a kind is a multiple of: one head, or all of them (``search.attention=whole``); one
    neuron, or ``prune.mlp_multiple``.

    Raises:
        ConfigError: if the MLP's width is not a multiple of ``prune.mlp_multiple``.
    """
    if geo.intermediate % cfg.mlp_multiple:
        raise ConfigError(
            f"prune.mlp_multiple={cfg.mlp_multiple} does not divide the model's MLP width {geo.intermediate}"
        )
    return {"attn": geo.heads if attention == "whole" else 1, "mlp": cfg.mlp_multiple}


def initial_centres(geo: Geometry, cfg: PruneConfig, attention: str = "heads") -> dict[Kind, list[int]]:
    """The uniform starting point: each type at the target, spread over layers as evenly as whole groups allow; with
    ``prune.budget=params`` both types at the group fraction whose estimated physical removal is the target."""
    units = group_units(geo, cfg, attention)
    if cfg.budget == "params":
        return params_centres(geo, cfg.target_sparsity, cfg.sparsity_tolerance, units)
    return {
        kind: uniform_centres(
            [geo.groups(kind)] * geo.num_layers, cfg.target_sparsity, kind, cfg.sparsity_tolerance, units[kind]
        )
        for kind in KINDS
    }


def plan_iteration(
    geo: Geometry, cfg: PruneConfig, iteration: int, centres: dict[Kind, list[int]], attention: str = "heads"
) -> list[Sublayer]:
    """The supernet grid of iteration ``iteration`` (1-based): interval halves each iteration (docs/algorithm.md)."""
    interval = cfg.interval / 2 ** (iteration - 1)
    groups = {kind: geo.groups(kind) for kind in KINDS}
    return build_sublayers(groups, geo.num_layers, centres, interval, cfg.num_levels, group_units(geo, cfg, attention))


def magnitude_layout(model: nn.Module, geo: Geometry, sublayers: list[Sublayer]) -> PrunedLayout:
    """Baseline: the centre group counts, chosen by output-column norm, without refit."""
    layout = {}
    for sub in sublayers:
        lin = output_linear(model.model.layers[sub.layer], sub.kind)
        layout[(sub.layer, sub.kind)] = magnitude_prune(lin.weight, geo.group_size(sub.kind), sub.groups - sub.centre)
    return layout


def apply_layout(model: nn.Module, layout: PrunedLayout, geo: Geometry) -> None:
    """Write a layout into ``model`` in place as masked weights (zero columns for removed groups)."""
    with torch.no_grad():
        for (layer, kind), sub in layout.items():
            lin = output_linear(model.model.layers[layer], kind)
            lin.weight.copy_(scatter_columns(sub, lin.in_features, geo.group_size(kind)))


@dataclass
class IterationResult:
    iteration: int
    levels: list[int]
    fitness: float | None
    sparsities: dict[str, float]
    next_centres: dict
    validation_fitness: float | None  # the winner's fitness on every window the teacher covers
    supernet_s: float
    search_s: float
    generation_s: list[float]
    supernet_bytes: int
    removed_fraction: float = 0.0  # of the decoder's parameters, physically (as the export removes them)
    scan: dict | None = None  # the sensitivity scan, when the search used one
    scan_s: float = 0.0
    scan_tokens: int = 0  # candidate tokens the scan scored
    search_tokens: int = 0  # candidate tokens the generations scored (the winner's validation score apart)


def run_iteration_local(
    model_folder: Path,
    windows: torch.Tensor,
    teacher: TeacherTopK,
    cfg: RunConfig,
    iteration: int,
    centres: dict,
    workdir: Path,
    progress: Progress | None = None,
    search_windows: torch.Tensor | None = None,
) -> IterationResult:
    """One coarse-to-fine iteration with plain core functions (no orchestration): supernet, then search.

    ``windows`` refit the copies; the search scores ``search_windows`` (the windows the teacher was computed on;
    default: the first of ``windows``), and the winner is scored on all of them for the validation fitness.
    """
    from .fitness import make_kl_evaluator
    from .search import initial_state, run_generation
    from .sensitivity import make_guide, run_scan, scan_window_ids, start_levels

    where = placement(cfg)
    lm = LayerwiseModel(model_folder, device=where.device)
    check_fits(lm, cfg, where)
    subs = plan_iteration(lm.geometry, cfg.prune, iteration, centres, cfg.search.attention)
    out = workdir / f"iter-{iteration}"
    t0 = time.perf_counter()
    settings = prune_settings(cfg.prune, device_budget_bytes=where.budget_bytes // 2)
    index = build_supernet(SupernetBuild(lm, windows, subs, settings, out, iteration), progress)
    supernet_s = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32, use_safetensors=True).eval()
    model.config._attn_implementation = "sdpa"
    forward = resident_or_streamed(model, subs, where, (2 << 30) if cfg.search.prefix_sharing else 0)
    forward.capture = tuple(cfg.search.hidden_layer_ids(lm.geometry.num_layers))
    sm = SupernetModel(model, SupernetReader(out), lm.geometry)
    search_windows = (windows if search_windows is None else search_windows)[: teacher.index["windows"]]
    captured = (lambda: forward.captured) if forward.capture else None
    evaluate = make_kl_evaluator(
        sm.apply, forward.logits, search_windows, teacher, hidden_weight=cfg.search.hidden_weight, captured=captured
    )
    scan, scan_s = None, 0.0
    if cfg.search.needs_scan:
        s0 = time.perf_counter()
        forward.set_reference([0] * len(subs))
        ids = scan_window_ids(cfg.search.scan_tokens, *search_windows.shape)
        scan = run_scan([0] * len(subs), subs, evaluate, ids, iteration, search_windows.shape[1])
        scan_s = time.perf_counter() - s0
    scan_tokens = evaluate.tokens_scored
    budget = search_budget(lm.geometry, index, subs, cfg.prune)
    guide = make_guide(cfg.search, subs, scan, budget)
    state = initial_state(subs, cfg.seed + iteration, iteration, start_levels(cfg.search, subs, scan, budget))
    gen_s = []
    for _ in range(cfg.search.generations):
        g0 = time.perf_counter()
        forward.set_reference(state.parent)
        state = run_generation(state, subs, evaluate, cfg.search, *search_windows.shape, guide=guide)
        gen_s.append(time.perf_counter() - g0)
        if progress:
            progress("search", state.generation, cfg.search.generations)
    search_tokens = evaluate.tokens_scored - scan_tokens
    forward.set_reference(state.parent)
    validation = evaluate(state.parent, list(range(search_windows.shape[0])))
    removed = (budget or search_budget(lm.geometry, index, subs, cfg.prune, always=True)).removed_fraction(state.parent)
    return IterationResult(
        iteration=iteration,
        levels=state.parent,
        fitness=state.parent_fitness,
        validation_fitness=validation,
        sparsities={s.name: s.sparsity(lv) for s, lv in zip(subs, state.parent, strict=True)},
        next_centres=recentre(subs, state.parent),
        supernet_s=supernet_s,
        search_s=sum(gen_s),
        generation_s=gen_s,
        supernet_bytes=sum(e["bytes"] for e in index["copies"]),
        removed_fraction=removed,
        scan=scan.model_dump() if scan is not None else None,
        scan_s=scan_s,
        scan_tokens=scan_tokens,
        search_tokens=search_tokens,
    )


def search_budget(
    geo: Geometry, index: dict, genes: list[Sublayer], cfg: PruneConfig, always: bool = False
) -> ParamBudget | None:
    """The parameter budget of a supernet (``prune.budget=params``, or ``always`` to count a layout), else None."""
    if cfg.budget != "params" and not always:
        return None
    return budget_from_index(geo, index, genes, cfg.target_sparsity, cfg.budget_tolerance)
