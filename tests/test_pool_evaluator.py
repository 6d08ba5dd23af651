"""Batch-major pool evaluation gives the same fitness bits as scoring candidates one after another."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModelForCausalLM

from tyr_core.fitness import TeacherTopK, make_kl_evaluator, topk_kl, write_teacher_topk
from tyr_core.grid import build_sublayers
from tyr_core.layerwise import LayerwiseModel
from tyr_core.prefix import PrefixForward
from tyr_core.search import SearchConfig, offspring, select
from tyr_core.streaming import BlockStreamer
from tyr_core.supernet import SupernetModel, SupernetReader
from tyr_core.supernet_build import PruneSettings, SupernetBuild, build_supernet


def per_candidate(sm: SupernetModel, forward: PrefixForward, windows, teacher, candidates, window_ids, batch_size):
    """The search's evaluator before pool evaluation: each candidate on every batch, then the next candidate."""
    out = []
    for levels in candidates:
        sm.apply(levels)
        total, tokens = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(window_ids), batch_size):
                batch = window_ids[start : start + batch_size]
                values, ids = teacher.get(batch)
                kl, n = topk_kl(values, ids, forward.logits(windows[batch], levels))
                total, tokens = total + kl, tokens + n
        out.append(total / tokens)
    return out


def _search_model(folder, reader, budget):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.config._attn_implementation = "sdpa"
    sm = SupernetModel(model, reader, LayerwiseModel(folder).geometry)
    return sm, PrefixForward(model, reader.sublayers, budget)


@pytest.fixture(scope="module")
def built(tiny_folder, tmp_path_factory):
    """``built(family)`` -> (folder, sublayers, supernet folder, teacher), made once per family."""
    cache: dict = {}
    g = torch.Generator().manual_seed(1)
    steps = torch.randint(-3, 4, (24, 32), generator=g)
    windows = (steps.cumsum(dim=1) + torch.randint(0, 128, (24, 1), generator=g)) % 128

    def make(family: str):
        if family not in cache:
            folder, root = tiny_folder(family), tmp_path_factory.mktemp(f"pool-{family}")
            subs = build_sublayers({"attn": 4, "mlp": 128}, 2, {"attn": [2, 2], "mlp": [64, 64]}, 0.25, 5)
            build_supernet(SupernetBuild(LayerwiseModel(folder), windows[:8], subs, PruneSettings(), root / "s"))
            dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            write_teacher_topk(lambda ids: dense(ids).logits, windows, 32, root / "t", windows_per_shard=8)
            cache[family] = (folder, subs, root, TeacherTopK(root / "t"), windows)
        return cache[family]

    return make


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [0, 1 << 30, 1])  # no sharing, every batch cached, only the last batch kept
def test_pool_fitness_is_bit_identical_to_the_per_candidate_loop(family, budget, built):
    folder, subs, tmp_path, teacher, windows = built(family)
    parent = [0] * len(subs)
    candidates = [parent, *offspring(parent, subs, np.random.default_rng(3), 6)]
    window_ids = [1, 3, 4, 8, 9, 15, 20, 23, 5]  # three batches of 4, 4 and 1

    sm_old, fwd_old = _search_model(folder, SupernetReader(tmp_path / "s"), budget)
    fwd_old.set_reference(parent)
    want = per_candidate(sm_old, fwd_old, windows, teacher, candidates, window_ids, 4)

    sm, fwd = _search_model(folder, SupernetReader(tmp_path / "s"), budget)
    fwd.set_reference(parent)
    evaluate = make_kl_evaluator(sm.apply, fwd.logits, windows, teacher, batch_size=4)
    assert evaluate.pool(candidates, window_ids) == want
    assert [evaluate(c, window_ids) for c in candidates] == want
    assert len(set(want)) > 1

    # decoder blocks streamed through the device (copied in for each block's turn) give the same bits
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.config._attn_implementation = "sdpa"
    streamed = SupernetModel(model, SupernetReader(tmp_path / "s"), LayerwiseModel(folder).geometry)
    fwd = PrefixForward(model, streamed.reader.sublayers, budget, BlockStreamer(model, "cpu", always_copy=True))
    fwd.set_reference(parent)
    assert (
        make_kl_evaluator(streamed.apply, fwd.logits, windows, teacher, batch_size=4).pool(candidates, window_ids)
        == want
    )


def test_selection_with_a_pool_evaluator_picks_what_the_per_candidate_one_picks():
    subs = build_sublayers({"attn": 4, "mlp": 16}, 3, {"attn": [2] * 3, "mlp": [8] * 3}, 0.25, 5)
    weights = np.linspace(0.5, 2.0, len(subs))

    def fitness(levels, window_ids):
        return float(np.dot(weights, np.square(levels)) + 0.01 * sum(window_ids))

    class Pooled:
        def __init__(self):
            self.pools = 0

        def __call__(self, levels, window_ids):
            return fitness(levels, window_ids)

        def pool(self, candidates, window_ids):
            self.pools += 1
            return [fitness(c, window_ids) for c in candidates]

    cfg = SearchConfig(offspring=8, stage_tokens=[32, 64, 128], survivors=[4, 2, 1])
    parent = [0] * len(subs)
    kids = offspring(parent, subs, np.random.default_rng(0), 8)
    pooled = Pooled()
    a = select(kids, parent, pooled, cfg, np.random.default_rng(1), 16, 32)
    b = select(kids, parent, fitness, cfg, np.random.default_rng(1), 16, 32)
    assert (a.best, a.fitness, a.evaluations) == (b.best, b.fitness, b.evaluations)
    assert pooled.pools == 3  # one call per stage
