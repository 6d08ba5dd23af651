"""The search's fitness (docs/algorithm.md): renormalised top-k KL, the on-disk teacher cache, and the evaluator on a
tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from safetensors import safe_open
from transformers import LlamaForCausalLM

from tyr_core.errors import CalibrationError, MissingArtefactError, SearchError
from tyr_core.fitness import TeacherTopK, hidden_error, make_kl_evaluator, topk_kl, write_teacher_topk
from tyr_core.prefix import PrefixForward
from tyr_core.search import SearchConfig


def _logits(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def _teacher(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = torch.topk(logits, k, dim=-1)
    return top.values, top.indices.int()


# --- topk_kl ----------------------------------------------------------------------------------------------------------


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    logits = _logits(2, 6, 32)
    kl, tokens = topk_kl(*_teacher(logits, 8), logits)
    assert abs(kl) < 1e-5 and tokens == 2 * 5
    kl, _ = topk_kl(*_teacher(logits, 8), logits + _logits(2, 6, 32, seed=1))
    assert kl > 1e-2


def test_with_k_equal_to_the_vocabulary_it_is_the_full_kl():
    teacher, student = _logits(3, 7, 40), _logits(3, 7, 40, seed=1)
    kl, tokens = topk_kl(*_teacher(teacher, 40), student)
    full = F.kl_div(
        F.log_softmax(student[:, :-1], -1), F.log_softmax(teacher[:, :-1], -1), log_target=True, reduction="sum"
    )
    assert tokens == 3 * 6
    assert kl == pytest.approx(float(full), rel=1e-5)


def test_top_k_renormalises_both_distributions_over_the_teachers_k_ids():
    teacher, student = _logits(2, 5, 50), _logits(2, 5, 50, seed=2)
    values, ids = _teacher(teacher, 6)
    kl, _ = topk_kl(values, ids, student)
    # independent formula: full-vocabulary probabilities restricted to the teacher's ids, then renormalised
    p = torch.gather(teacher.softmax(-1), -1, ids.long())[:, :-1]
    q = torch.gather(student.softmax(-1), -1, ids.long())[:, :-1]
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    assert kl == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-4)
    outside = torch.ones_like(student).scatter(-1, ids.long(), 0.0).bool()
    assert topk_kl(values, ids, student.masked_fill(outside, 100.0))[0] == pytest.approx(kl)  # only the k ids count
    assert topk_kl(values, ids, student + 7.0)[0] == pytest.approx(kl, rel=1e-5)  # per-token shifts cancel


def test_the_last_position_of_each_window_is_dropped():
    teacher, student = _logits(2, 6, 32), _logits(2, 6, 32, seed=3)
    values, ids = _teacher(teacher, 8)
    kl, tokens = topk_kl(values, ids, student)
    changed_last, changed_before = student.clone(), student.clone()
    changed_last[:, -1] = _logits(2, 32, seed=4)
    changed_before[:, -2] = _logits(2, 32, seed=4)
    assert tokens == 2 * 5
    assert topk_kl(values, ids, changed_last)[0] == kl
    assert topk_kl(values, ids, changed_before)[0] != pytest.approx(kl)


def test_kl_is_computed_in_fp32_whatever_the_input_dtypes():
    values, ids = _teacher(_logits(2, 9, 64), 16)
    student = (_logits(2, 9, 64, seed=5) * 4).half()
    kl16, _ = topk_kl(values.half(), ids, student)
    kl32, _ = topk_kl(values.half().float(), ids, student.float())
    assert kl16 == kl32 and math.isfinite(kl16)


def test_mismatched_shapes_are_refused():
    values, ids = _teacher(_logits(2, 6, 32), 8)
    with pytest.raises(ValueError, match="share"):
        topk_kl(values, ids, _logits(2, 5, 32))
    with pytest.raises(ValueError):
        topk_kl(values, ids[..., :4], _logits(2, 6, 32))


# --- teacher cache ------------------------------------------------------------------------------------------------

N, T, V = 10, 6, 24


@pytest.fixture
def table() -> torch.Tensor:
    """Fixed logits per window; window ``w`` starts with token ``w`` so the fake model can look them up."""
    return _logits(N, T, V, seed=6)


def _windows() -> torch.Tensor:
    windows = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(7))
    windows[:, 0] = torch.arange(N)
    return windows


def test_teacher_cache_round_trips_exactly_in_fp16_and_int32(table, tmp_path):
    index = write_teacher_topk(lambda ids: table[ids[:, 0]], _windows(), 5, tmp_path, windows_per_shard=4)
    assert index["k"] == 5 and index["windows"] == N and len(index["shards"]) == 3
    teacher = TeacherTopK(tmp_path)
    asked = [7, 0, 9, 4, 7]
    values, ids = teacher.get(asked)
    expected = torch.topk(table[asked], 5, dim=-1)
    assert values.dtype == torch.float16 and ids.dtype == torch.int32 and values.shape == (5, T, 5)
    assert torch.equal(values, expected.values.half())
    assert torch.equal(ids, expected.indices.int())
    assert len(teacher) == N


def test_teacher_shards_are_written_as_they_fill_and_hold_one_shard_each(table, tmp_path):
    calls: list[tuple[int, int, int, bool]] = []  # (first window, batch size, shard files on disk, inference mode)

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        files = len(list(tmp_path.glob("*.safetensors")))
        calls.append((int(ids[0, 0]), ids.shape[0], files, torch.is_inference_mode_enabled()))
        return table[ids[:, 0]]

    write_teacher_topk(logits_fn, _windows(), 5, tmp_path, windows_per_shard=4, batch_size=3)
    assert [(w, b) for w, b, _, _ in calls] == [(0, 3), (3, 1), (4, 3), (7, 1), (8, 2)]
    assert all(files == first // 4 for first, _, files, _ in calls)  # earlier shards already on disk
    assert all(inference for *_, inference in calls)
    rows = []
    for name in TeacherTopK(tmp_path).index["shards"]:
        with safe_open(str(tmp_path / name), framework="pt") as f:
            rows.append(f.get_slice("values").get_shape()[0])
    assert rows == [4, 4, 2]


def test_teacher_shards_are_read_lazily(table, tmp_path):
    write_teacher_topk(lambda ids: table[ids[:, 0]], _windows(), 5, tmp_path, windows_per_shard=4)
    teacher = TeacherTopK(tmp_path)
    (tmp_path / teacher.index["shards"][0]).unlink()
    values, _ = teacher.get([8, 9])  # the last shard alone is enough
    assert torch.equal(values, torch.topk(table[[8, 9]], 5, dim=-1).values.half())
    with pytest.raises(MissingArtefactError, match="topk-00000"):
        teacher.get([1])


def test_k_is_clamped_to_the_vocabulary_and_huge_logits_stay_finite(tmp_path):
    logits = _logits(N, T, V, seed=8)
    logits[0, 0, 0] = 1e9
    index = write_teacher_topk(lambda ids: logits[ids[:, 0]], _windows(), 1000, tmp_path)
    values, ids = TeacherTopK(tmp_path).get([0])
    assert index["k"] == V and values.shape[-1] == V and index["vocab"] == V and index["seq_len"] == T
    assert torch.isfinite(values).all()


def test_teacher_errors_name_what_is_wrong(table, tmp_path):
    with pytest.raises(MissingArtefactError, match="index"):
        TeacherTopK(tmp_path)
    with pytest.raises(CalibrationError):
        write_teacher_topk(lambda ids: table[ids[:, 0]], torch.zeros(0, T, dtype=torch.long), 5, tmp_path)
    with pytest.raises(CalibrationError):
        write_teacher_topk(lambda ids: table[ids[:, 0]], torch.zeros(N, T), 5, tmp_path)
    write_teacher_topk(lambda ids: table[ids[:, 0]], _windows(), 5, tmp_path)
    with pytest.raises(SearchError, match="window 10"):
        TeacherTopK(tmp_path).get([10])


# --- the evaluator on a tiny Llama --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    return tiny_model("llama")


def _head_pruner(model: LlamaForCausalLM):
    """``apply_levels`` for a toy genome of one attention gene per layer: level ``l`` zeroes the first ``l`` heads'
    o_proj columns (restoring the dense weight first, as a supernet swap would)."""
    dense = [layer.self_attn.o_proj.weight.detach().clone() for layer in model.model.layers]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    applied: list[tuple[list[int], bool]] = []

    def apply_levels(levels: list[int]) -> None:
        applied.append((levels, torch.is_inference_mode_enabled()))
        with torch.no_grad():
            for layer, weight, level in zip(model.model.layers, dense, levels, strict=True):
                layer.self_attn.o_proj.weight.copy_(weight)
                layer.self_attn.o_proj.weight[:, : level * head_dim] = 0

    return apply_levels, applied


def test_evaluator_is_zero_for_the_dense_model_and_positive_when_heads_are_removed(tiny_llama, tmp_path):
    windows = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(9))
    write_teacher_topk(lambda ids: tiny_llama(ids).logits, windows, 32, tmp_path, windows_per_shard=4)
    apply_levels, applied = _head_pruner(tiny_llama)
    inference: list[bool] = []

    def logits_fn(ids: torch.Tensor, _levels: list[int]) -> torch.Tensor:
        inference.append(torch.is_inference_mode_enabled())
        return tiny_llama(ids).logits

    evaluate = make_kl_evaluator(apply_levels, logits_fn, windows, TeacherTopK(tmp_path), batch_size=4)
    all_windows = list(range(6))
    dense = evaluate([0, 0], all_windows)
    pruned = evaluate([2, 1], all_windows)
    assert 0 <= dense < 1e-5  # only the fp16 rounding of the cached teacher
    assert pruned > 1e-4 and pruned > 100 * dense
    assert evaluate([0, 0], all_windows) == pytest.approx(dense, abs=1e-9)  # the candidate really was swapped back
    # applied before every batch (a no-op for a supernet model already at those levels): 6 windows, 2 batches
    assert [lv for lv, _ in applied] == [[0, 0]] * 2 + [[2, 1]] * 2 + [[0, 0]] * 2
    assert not any(mode for _, mode in applied) and all(inference)  # weights written outside inference mode

    # token-weighted mean over windows, whatever the batching (4 + 2 windows vs one batch)
    one_batch = make_kl_evaluator(apply_levels, logits_fn, windows, TeacherTopK(tmp_path), batch_size=6)
    assert one_batch([2, 1], all_windows) == pytest.approx(pruned, rel=1e-5)
    values, ids = TeacherTopK(tmp_path).get([1, 4])
    with torch.no_grad():
        kl, tokens = topk_kl(values, ids, tiny_llama(windows[[1, 4]]).logits)  # still at [2, 1]
    assert evaluate([2, 1], [1, 4]) == pytest.approx(kl / tokens, rel=1e-5)


def test_evaluator_refuses_windows_the_teacher_did_not_see(tiny_llama, tmp_path):
    windows = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(10))
    write_teacher_topk(lambda ids: tiny_llama(ids).logits, windows, 16, tmp_path)
    teacher = TeacherTopK(tmp_path)
    apply_levels, _ = _head_pruner(tiny_llama)

    def logits_fn(ids, _levels):
        return tiny_llama(ids).logits

    with pytest.raises(SearchError, match="covers only 4"):
        make_kl_evaluator(apply_levels, logits_fn, torch.zeros(5, 8, dtype=torch.long), teacher)
    with pytest.raises(SearchError, match="teacher saw 8"):
        make_kl_evaluator(apply_levels, logits_fn, torch.zeros(4, 9, dtype=torch.long), teacher)
    with pytest.raises(SearchError, match="at least one window"):
        make_kl_evaluator(apply_levels, logits_fn, windows, teacher)([0, 0], [])


# --- the hidden-state term (eq. 6) ---------------------------------------------------------------------------------


def test_hidden_error_is_zero_when_equal_scale_free_and_the_layer_mean_of_relative_errors():
    dense = _logits(2, 3, 5, 8)  # (B, H, T, d)
    assert hidden_error(dense, dense.clone()) == (0.0, 2 * 4)
    noisy = dense + 0.1 * _logits(2, 3, 5, 8, seed=1)
    err, tokens = hidden_error(dense, noisy)
    assert err == pytest.approx(hidden_error(3 * dense, 3 * noisy)[0], rel=1e-5)  # one weight fits every scale
    by_hand = ((noisy - dense)[:, :, :-1].pow(2).sum(-1) / dense[:, :, :-1].pow(2).sum(-1)).mean(1).sum()
    assert tokens == 8 and err == pytest.approx(float(by_hand), rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        hidden_error(dense, noisy[:, :2])


def test_the_hidden_term_adds_its_weight_times_the_error_of_the_cached_dense_states(tiny_llama, tmp_path):
    windows = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(11))
    layers = [0, 1]
    forward = PrefixForward(tiny_llama, [], 0, capture=layers)
    index = write_teacher_topk(
        lambda ids: forward.logits(ids, []),
        windows,
        32,
        tmp_path,
        4,
        captured=lambda: forward.captured,
        hidden_layers=layers,
    )
    teacher = TeacherTopK(tmp_path)
    assert index["hidden_layers"] == layers == teacher.hidden_layers
    with torch.no_grad():
        states = tiny_llama(windows[[1, 4]], output_hidden_states=True).hidden_states
    torch.testing.assert_close(teacher.hidden([1, 4])[:, 0].float(), states[1], rtol=2e-3, atol=2e-3)  # fp16
    apply_levels, _ = _head_pruner(tiny_llama)
    kl_only = make_kl_evaluator(apply_levels, forward.logits, windows, teacher)
    with_hidden = make_kl_evaluator(
        apply_levels, forward.logits, windows, teacher, hidden_weight=0.5, captured=lambda: forward.captured
    )
    all_windows = list(range(6))
    assert with_hidden([0, 0], all_windows) < 1e-5  # the dense model: only the fp16 rounding of the cache
    kl, total = kl_only([2, 1], all_windows), with_hidden([2, 1], all_windows)
    with torch.no_grad():
        forward.logits(windows, [])
        err, tokens = hidden_error(teacher.hidden(all_windows), forward.captured)
    assert total == pytest.approx(kl + 0.5 * err / tokens, rel=1e-4) and err > 0
    # the per-window scores of paired selection carry the same term
    per_window = with_hidden.pool_windows([[2, 1]], all_windows)[0]
    assert sum(per_window) / 6 == pytest.approx(total, rel=1e-4)


def test_the_hidden_term_refuses_a_cache_without_hidden_states(tiny_llama, tmp_path):
    windows = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(12))
    forward = PrefixForward(tiny_llama, [], 0, capture=[0])
    with pytest.raises(ValueError, match="go together"):
        write_teacher_topk(lambda ids: forward.logits(ids, []), windows, 16, tmp_path, hidden_layers=[0])
    write_teacher_topk(lambda ids: forward.logits(ids, []), windows, 16, tmp_path)
    teacher = TeacherTopK(tmp_path)
    apply_levels, _ = _head_pruner(tiny_llama)
    with pytest.raises(SearchError, match="keeps no hidden states"):
        teacher.hidden([0])
    with pytest.raises(SearchError, match="hidden_weight > 0 needs"):
        make_kl_evaluator(
            apply_levels, forward.logits, windows, teacher, hidden_weight=1.0, captured=lambda: forward.captured
        )
    with pytest.raises(SearchError, match=">= 0"):
        make_kl_evaluator(apply_levels, forward.logits, windows, teacher, hidden_weight=-1.0)


def test_hidden_layers_default_to_the_first_middle_and_last_and_are_checked():
    assert SearchConfig().hidden_layer_ids(30) == []  # the term is off: the teacher keeps no states
    assert SearchConfig(hidden_weight=1.0).hidden_layer_ids(30) == [0, 15, 29]
    assert SearchConfig(hidden_weight=1.0, hidden_layers=[-1, 3, 3]).hidden_layer_ids(30) == [3, 29]
    with pytest.raises(SearchError, match=r"search.hidden_layers=\[30\]"):
        SearchConfig(hidden_weight=1.0, hidden_layers=[30]).hidden_layer_ids(30)
