"""Prefix sharing gives exactly the logits of a full forward, and skips the layers a candidate shares."""

from __future__ import annotations

import torch
from conftest import tiny_model

from tyr_core.grid import build_sublayers
from tyr_core.prefix import PrefixForward


def _perturb(model, layer: int, kind: str, scale: float) -> None:
    block = model.model.layers[layer]
    lin = block.self_attn.o_proj if kind == "attn" else block.mlp.down_proj
    with torch.no_grad():
        lin.weight.mul_(scale)


def test_candidate_logits_equal_a_full_forward_and_skip_the_shared_prefix(windows):
    model = tiny_model("llama", num_hidden_layers=4)
    model.config._attn_implementation = "sdpa"
    subs = build_sublayers({"attn": 4, "mlp": 128}, 4, {"attn": [2] * 4, "mlp": [64] * 4}, 0.25, 5)
    fwd = PrefixForward(model, subs)
    parent = [0] * 8
    fwd.set_reference(parent)
    ids = windows[:4]
    with torch.inference_mode():
        ref = fwd.logits(ids, parent)
        torch.testing.assert_close(ref, model(ids).logits)
        _perturb(model, 2, "mlp", 0.5)  # the candidate changes layer 2's MLP
        child = [0, 0, 0, 0, 0, 1, 0, 0]
        ran = fwd.layers_run
        out = fwd.logits(ids, child)
        assert fwd.layers_run - ran == 2  # layers 2 and 3 only
        torch.testing.assert_close(out, model(ids).logits)
        assert not torch.allclose(out, ref)
        # on a new minibatch the first candidate fills the shared prefix (layers 0-1) for the next ones
        other = windows[4:8]
        ran = fwd.layers_run
        torch.testing.assert_close(fwd.logits(other, child), model(other).logits)
        assert fwd.layers_run - ran == 4
        _perturb(model, 2, "mlp", 2.0)  # back to the parent's weights
        ran = fwd.layers_run
        torch.testing.assert_close(fwd.logits(other, parent), model(other).logits)
        assert fwd.layers_run - ran == 2  # layers 2-3: the prefix 0-1 came from the child's run


def test_captured_layers_are_the_models_hidden_states_whether_shared_or_recomputed(windows):
    model = tiny_model("llama", num_hidden_layers=4)
    model.config._attn_implementation = "sdpa"
    subs = build_sublayers({"attn": 4, "mlp": 128}, 4, {"attn": [2] * 4, "mlp": [64] * 4}, 0.25, 5)
    fwd = PrefixForward(model, subs, capture=(0, 2, 3))
    parent = [0] * 8
    fwd.set_reference(parent)
    ids = windows[:4]
    with torch.inference_mode():
        fwd.logits(ids, parent)  # fills the shared prefix
        _perturb(model, 2, "mlp", 0.5)
        fwd.logits(ids, [0, 0, 0, 0, 0, 1, 0, 0])  # layers 0-1 shared, 2-3 recomputed
        states = model(ids, output_hidden_states=True).hidden_states  # [embeddings, layer 0, ..., last (normed)]
    assert fwd.captured.shape == (4, 3, ids.shape[1], model.config.hidden_size)
    torch.testing.assert_close(fwd.captured[:, 0], states[1])  # layer 0: read from the parent's cache
    torch.testing.assert_close(fwd.captured[:, 1], states[3])  # layer 2: the candidate's own
    # HF returns the last layer after the final norm; the capture is the block's output, before it
    torch.testing.assert_close(model.model.norm(fwd.captured[:, 2]), states[4])
    assert PrefixForward(model, subs).captured is None
