"""The Ray search evaluator's arithmetic without Ray: units of (candidate, shard of whole batches) spread over any
number of replicas, each with its own model and prefix cache, add up to the local pool's fitness bits."""

from __future__ import annotations

import numpy as np
import pytest
from test_pool_evaluator import _search_model, built  # noqa: F401 (a fixture)

from tyr_core.fitness import make_kl_evaluator
from tyr_core.search import offspring
from tyr_core.supernet import SupernetReader
from tyr_runtime.ray_engine import RayPoolEvaluator, shards


def test_shards_are_contiguous_whole_batches_in_order():
    batches = [[i] for i in range(7)]
    for count in range(1, 10):
        parts = shards(batches, count)
        assert len(parts) == min(count, 7) and [b for p in parts for b in p] == batches
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


class _Call:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)  # the answer itself stands for the object ref


class _Replica:
    """A replica's process: its own search model and prefix cache, as ``worker_steps.search_terms`` builds them."""

    def __init__(self, make_evaluator):
        self.make_evaluator, self.evaluator, self.units = make_evaluator, None, 0
        self.search_terms = _Call(self._terms)

    def _terms(self, iteration, reference, groups, units):
        self.evaluator = self.evaluator or self.make_evaluator(reference)
        self.units += units
        return [self.evaluator.batch_terms([list(c) for c in cands], list(batch)) for batch, cands in groups]


class _Engine:
    def __init__(self, replicas):
        self._replicas = replicas

    def replicas(self):
        return self._replicas

    def get(self, refs):
        return list(refs)


@pytest.mark.parametrize("replicas", [1, 2, 3, 5])
def test_units_on_any_number_of_replicas_give_the_local_pool_bits(built, replicas):  # noqa: F811
    folder, subs, root, teacher, windows = built("llama")
    parent = [0] * len(subs)
    candidates = [parent, *offspring(parent, subs, np.random.default_rng(3), 6)]

    def evaluator(reference):
        sm, fwd = _search_model(folder, SupernetReader(root / "s"), 1 << 30)
        fwd.set_reference(reference)
        return make_kl_evaluator(sm.apply, fwd.logits, windows, teacher, batch_size=4)

    fakes = [_Replica(evaluator) for _ in range(replicas)]
    remote = RayPoolEvaluator(_Engine(fakes), 1, parent, batch_size=4)
    for window_ids in ([1, 3, 4, 8, 9, 15, 20, 23, 5], [2, 6], list(range(24))):  # 3, 1 and 6 batches
        want = evaluator(parent).pool(candidates, window_ids)
        assert remote.pool(candidates, window_ids) == want
        assert remote(candidates[1], window_ids) == want[1]
    assert all(f.units > 0 for f in fakes)  # every replica got units
    assert sum(remote.units_sent.values()) == sum(f.units for f in fakes)
