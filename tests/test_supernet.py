"""Supernet build on tiny models of every family: grids, exactness, expectation accumulation, storage."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModelForCausalLM

from tyr_core.errors import CorruptArtefactError, MissingArtefactError
from tyr_core.grid import build_sublayers
from tyr_core.layerwise import Activations, LayerwiseModel, embed_windows, run_block
from tyr_core.sublayer_layout import scatter_columns
from tyr_core.supernet import SupernetModel, SupernetReader, load_copy, output_linear, save_copy
from tyr_core.supernet_build import LayerCursor, PruneSettings, SupernetBuild, build_supernet

CENTRES = {"attn": [2, 2], "mlp": [64, 64]}


def _build(folder, windows, tmp_path, mode="expectation", interval=0.25):
    lm = LayerwiseModel(folder)
    subs = build_sublayers({"attn": 4, "mlp": 128}, 2, CENTRES, interval, 9)
    index = build_supernet(SupernetBuild(lm, windows, subs, PruneSettings(accumulation=mode), tmp_path))
    return lm, subs, index


@pytest.mark.parametrize("family", FAMILIES)
def test_every_level_has_its_group_counts_and_shapes(family, tiny_folder, windows, tmp_path):
    lm, subs, index = _build(tiny_folder(family), windows, tmp_path)
    reader = SupernetReader(tmp_path)
    assert len(index["copies"]) == sum(len(s.levels) for s in subs)
    for sub in subs:
        gs = lm.geometry.group_size(sub.kind)
        for level in sub.levels:
            c = reader.load(sub.layer, sub.kind, level)
            assert c.kept.numel() == sub.groups - sub.removed(level)
            assert c.weight.shape == (64, c.kept.numel() * gs)
            assert torch.equal(c.kept, torch.sort(c.kept).values)
    assert {e["sparsity"] for e in index["copies"] if e["kind"] == "attn"} == {0.0, 0.25, 0.5, 0.75, 1.0}


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_level_reproduces_the_model_exactly(family, tiny_folder, windows, tmp_path):
    lm, subs, _ = _build(tiny_folder(family), windows, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder(family)).eval()
    with torch.no_grad():
        ref = model(windows).logits
    sm = SupernetModel(model, SupernetReader(tmp_path), lm.geometry)
    sm.apply([0] * len(subs))
    with torch.no_grad():
        pruned = model(windows).logits
    assert not torch.allclose(pruned, ref)
    dense_levels = [s.lo for s in subs]  # centre 50% with a 25% step: the lowest level removes nothing
    assert sm.apply(dense_levels) == len(subs)
    assert sm.apply(dense_levels) == 0  # applying again swaps nothing
    with torch.no_grad():
        assert torch.equal(model(windows).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_forward_matches_the_hf_model(family, tiny_folder, windows):
    lm = LayerwiseModel(tiny_folder(family))
    model = AutoModelForCausalLM.from_pretrained(tiny_folder(family)).eval()
    acts = [Activations((24, 32, 64), torch.float32, 1 << 30, None) for _ in range(2)]
    embed_windows(lm, windows, acts[0], 8)
    pos = lm.position_embeddings(32)
    for i in range(lm.num_layers):
        run_block(lm.block(i), acts[i % 2], acts[(i + 1) % 2], pos, 8)
    with torch.no_grad():
        logits = lm.lm_head()(lm.final_norm()(acts[lm.num_layers % 2].data))
        torch.testing.assert_close(logits, model(windows).logits, atol=1e-5, rtol=1e-5)


def _layer0(folder, windows, subs, mode):
    """Build layer 0's copies with a cursor; returns (cursor after advancing, copies by kind)."""
    cursor = LayerCursor(LayerwiseModel(folder), windows, PruneSettings(accumulation=mode))
    copies = {s.kind: {lv: cursor.prune(s, lv) for lv in s.levels} for s in subs if s.layer == 0}
    cursor.advance(subs, copies)
    return cursor, copies


@pytest.mark.parametrize("mode", ["expectation", "centre", "none"])
def test_next_layer_sees_a_forward_through_the_expected_weights(mode, tiny_folder, windows):
    folder = tiny_folder("llama")
    subs = build_sublayers({"attn": 4, "mlp": 128}, 2, CENTRES, 0.25, 9)
    cursor, copies = _layer0(folder, windows, subs, mode)

    lm = LayerwiseModel(folder)
    block = lm.block(0)
    for sub in subs[:2]:
        lin = output_linear(block, sub.kind)
        gs = lm.geometry.group_size(sub.kind)
        if mode == "expectation":
            w = torch.tensor([1 - sub.sparsity(lv) for lv in sub.levels])
            w = w / w.sum()
            full = [scatter_columns(copies[sub.kind][lv], lin.in_features, gs) for lv in sub.levels]
            want = sum(wi * f for wi, f in zip(w, full, strict=True))
        elif mode == "centre":
            want = scatter_columns(copies[sub.kind][0], lin.in_features, gs)
        else:
            want = lin.weight.detach().clone()
        with torch.no_grad():
            lin.weight.copy_(want)
    inputs = Activations((24, 32, 64), torch.float32, 1 << 30, None)
    expected = Activations((24, 32, 64), torch.float32, 1 << 30, None)
    embed_windows(lm, windows, inputs, 8)
    run_block(block, inputs, expected, lm.position_embeddings(32), 8)
    torch.testing.assert_close(cursor.inputs.data, expected.data, atol=1e-5, rtol=1e-5)


def test_a_fresh_cursor_replays_committed_layers_to_the_same_activations(tiny_folder, windows, tmp_path):
    folder = tiny_folder("qwen2")
    lm, subs, _ = _build(folder, windows, tmp_path)
    reader = SupernetReader(tmp_path)
    first, _ = _layer0(folder, windows, subs, "expectation")
    fresh = LayerCursor(LayerwiseModel(folder), windows, PruneSettings(spill_dir=tmp_path, activation_budget_bytes=1))
    assert fresh.inputs.spilled  # over budget: activations live in a file, results are the same
    fresh.seek(
        1,
        subs,
        lambda layer: {
            s.kind: {lv: reader.load(layer, s.kind, lv) for lv in s.levels} for s in subs if s.layer == layer
        },
    )
    assert fresh.layer == 1
    torch.testing.assert_close(fresh.inputs.data, first.inputs.data, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="past layer 0"):
        fresh.seek(0, subs, lambda layer: {})


def test_gqa_kv_heads_removed_only_with_their_whole_group(tiny_folder):
    geo = LayerwiseModel(tiny_folder("llama")).geometry  # 4 query heads, 2 KV heads
    assert geo.kv_kept(torch.tensor([0, 1, 2, 3])) == 2
    assert geo.kv_kept(torch.tensor([0, 2])) == 2  # one head left in each KV group: both KV heads stay
    assert geo.kv_kept(torch.tensor([2, 3])) == 1  # KV group 0 lost all its query heads
    assert geo.kv_kept(torch.tensor([], dtype=torch.long)) == 0
    per_head = 2 * 64 * 16
    assert geo.sublayer_params("attn", torch.tensor([2, 3])) == 2 * per_head + 2 * 64 * 16
    assert geo.sublayer_params("attn", torch.tensor([0, 2])) == 2 * per_head + 2 * 2 * 64 * 16


def test_qwen2_bias_parameters_are_counted(tiny_folder):
    geo = LayerwiseModel(tiny_folder("qwen2")).geometry
    assert geo.qkv_bias
    assert geo.sublayer_params("attn", torch.tensor([0])) == 64 * 16 * 4 + 16 * 3


def test_store_round_trip_is_bit_exact_and_corruption_is_detected(tiny_folder, windows, tmp_path):
    lm, subs, index = _build(tiny_folder("qwen3"), windows, tmp_path)
    reader = SupernetReader(tmp_path)
    c = reader.load(1, "mlp", 1)
    save_copy(tmp_path / "again.safetensors", c)
    back = load_copy(tmp_path / "again.safetensors")
    assert torch.equal(back.weight, c.weight) and torch.equal(back.kept, c.kept)
    entry = reader.entry(1, "mlp", 1)
    path = tmp_path / entry["key"]
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptArtefactError, match="level\\+1"):
        SupernetReader(tmp_path).load(1, "mlp", 1)
    with pytest.raises(MissingArtefactError, match="level 7"):
        reader.load(1, "mlp", 7)


def test_compact_copies_are_about_half_the_zero_filled_bytes(tiny_folder, windows, tmp_path):
    _, _, index = _build(tiny_folder("llama"), windows, tmp_path)
    stored = sum(e["bytes"] for e in index["copies"])
    zero_filled = sum(64 * (64 if e["kind"] == "attn" else 128) * 4 for e in index["copies"])
    assert stored / zero_filled < 0.6


def test_accumulation_modes_feed_different_inputs(tiny_folder, windows, tmp_path):
    folder = tiny_folder("llama")
    idx = {m: _build(folder, windows, tmp_path / m, mode=m)[2] for m in ("expectation", "none")}
    by = {m: {(e["layer"], e["kind"], e["level"]): e["sha256"] for e in idx[m]["copies"]} for m in idx}
    layer0 = [k for k in by["none"] if k[0] == 0]
    layer1 = [k for k in by["none"] if k[0] == 1 and k[2] != -2]
    assert all(by["none"][k] == by["expectation"][k] for k in layer0)  # layer 0 sees the same inputs
    assert any(by["none"][k] != by["expectation"][k] for k in layer1)


def test_without_accumulation_each_copy_is_independent_of_the_other_levels(tiny_folder, windows, tmp_path):
    folder = tiny_folder("llama")
    hashes = {}
    for levels in (9, 1):
        subs = build_sublayers({"attn": 4, "mlp": 128}, 2, CENTRES, 0.25, levels)
        settings = PruneSettings(accumulation="none")
        index = build_supernet(SupernetBuild(LayerwiseModel(folder), windows, subs, settings, tmp_path / str(levels)))
        hashes[levels] = {(e["layer"], e["kind"]): e["sha256"] for e in index["copies"] if e["level"] == 0}
    assert hashes[1] == hashes[9]  # so a uniform model without accumulation needs only its centre copies


def test_reader_takes_the_grid_from_the_index(tiny_folder, windows, tmp_path):
    _, subs, _ = _build(tiny_folder("mistral"), windows, tmp_path)
    assert SupernetReader(tmp_path).sublayers == subs


def test_dense_refit_target_keeps_a_dense_stream_beside_the_pruned_one(tiny_folder, windows):
    folder = tiny_folder("llama")
    subs = build_sublayers({"attn": 4, "mlp": 128}, 2, CENTRES, 0.25, 9)
    cursor = LayerCursor(LayerwiseModel(folder), windows, PruneSettings(refit_target="dense"))
    copies = {s.kind: {lv: cursor.prune(s, lv) for lv in s.levels} for s in subs if s.layer == 0}
    cursor.advance(subs, copies)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        dense_hidden = model(windows, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(cursor._dense[1].data, dense_hidden, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cursor.inputs.data, dense_hidden, atol=1e-3)
    # the copies of layer 1 differ from the pruned-target ones: they fit the dense stream's outputs
    plain = LayerCursor(LayerwiseModel(folder), windows, PruneSettings())
    plain.advance(subs, copies)
    sub = subs[3]
    assert not torch.allclose(cursor.prune(sub, 0).weight, plain.prune(sub, 0).weight)


def test_mlp_statistics_after_attention_see_the_expected_attention(tiny_folder, windows):
    folder = tiny_folder("llama")
    subs = build_sublayers({"attn": 4, "mlp": 128}, 2, CENTRES, 0.25, 9)
    plain = LayerCursor(LayerwiseModel(folder), windows, PruneSettings())
    after = LayerCursor(LayerwiseModel(folder), windows, PruneSettings(mlp_after_attention=True), subs)
    # attention statistics are unchanged; the MLP's are those of a block whose o_proj has its expected weight
    torch.testing.assert_close(after.hessians()["attn"], plain.hessians()["attn"], atol=0, rtol=0)
    assert not torch.allclose(after.hessians()["mlp"], plain.hessians()["mlp"], rtol=1e-3)
    copies = {lv: plain.prune(subs[0], lv) for lv in subs[0].levels}
    lm = LayerwiseModel(folder)
    block = lm.block(0)
    lin = output_linear(block, "attn")
    with torch.no_grad():
        from tyr_core.supernet_build import expected_weight, layer_stats

        lin.weight.copy_(expected_weight(subs[0], copies, lin.weight.detach(), lm.geometry, "expectation"))
    inputs = Activations((24, 32, 64), torch.float32, 1 << 30, None)
    embed_windows(lm, windows, inputs, 8)
    want = layer_stats(block, inputs, lm.position_embeddings(32), 8)["mlp"]
    torch.testing.assert_close(after.hessians()["mlp"], want, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="sublayers"):
        LayerCursor(LayerwiseModel(folder), windows, PruneSettings(mlp_after_attention=True))
