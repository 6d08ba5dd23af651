"""Exports on tiny models of every family: compact == masked logits, honest parameter counts, smaller files,
reload round trips, generate(), Nemotron-NAS rules and refusals, and the sparsity report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, tiny_model
from transformers import AutoModelForCausalLM

from tyr_core.errors import ExportError
from tyr_core.export import (
    build_compact_model,
    masked_model,
    nemotron_config,
    save_compact,
    save_masked,
    save_nemotron,
    validate_nemotron,
    write_sparsity_report,
)
from tyr_core.params import count_module_params, layout_params
from tyr_core.pruned import PrunedSublayer

ATOL = 1e-5  # fp32; compact and masked differ only in summation order


def _layout(model, heads: dict[int, list[int]], neurons: dict[int, int], seed: int = 0):
    """Layer -> kept query heads, and kept neuron counts; refitted weights are random of the right shape."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    layout = {}
    for layer in range(cfg.num_hidden_layers):
        kept = torch.tensor(heads.get(layer, list(range(cfg.num_attention_heads))), dtype=torch.long)
        layout[(layer, "attn")] = PrunedSublayer(
            kept, torch.randn(cfg.hidden_size, kept.numel() * 16, generator=g) * 0.1
        )
        n = neurons.get(layer, cfg.intermediate_size)
        kept_n = torch.sort(torch.randperm(cfg.intermediate_size, generator=g)[:n]).values
        layout[(layer, "mlp")] = PrunedSublayer(kept_n, torch.randn(cfg.hidden_size, n, generator=g) * 0.1)
    return layout


# layer 0: heads pruned unevenly across KV groups (group 0 keeps 1, group 1 keeps 2) and a narrower MLP;
# layer 1: attention removed; layer 2: MLP removed and a whole KV group gone
HEADS = {0: [0, 2, 3], 1: [], 2: [2, 3]}
NEURONS = {0: 100, 1: 64, 2: 0}


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_model_equals_masked_model_and_counts_its_parameters(family, windows):
    model = tiny_model(family, num_hidden_layers=3)
    layout = _layout(model, HEADS, NEURONS)
    masked, compact = masked_model(model, layout), build_compact_model(model, layout)
    with torch.no_grad():
        torch.testing.assert_close(compact(windows).logits, masked(windows).logits, atol=ATOL, rtol=ATOL)
    accounted = layout_params(model.config, layout)
    assert count_module_params(compact) == accounted["total"]
    assert accounted["removed"] > 0 and count_module_params(masked) == count_module_params(model)
    assert compact.model.layers[0].self_attn.k_proj.out_features == 2 * 16  # both KV heads still read
    assert compact.model.layers[2].self_attn.k_proj.out_features == 16  # KV group 0 lost all its heads


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_saved_compact_model_reloads_generates_and_is_smaller(family, windows, tmp_path):
    model = tiny_model(family, num_hidden_layers=3)
    layout = _layout(model, HEADS, NEURONS)
    save_compact(model, layout, tmp_path / "compact")
    save_masked(model, layout, tmp_path / "masked")
    size = {k: (tmp_path / k / "model.safetensors").stat().st_size for k in ("compact", "masked")}
    assert size["compact"] < 0.8 * size["masked"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compact").eval()
    masked = AutoModelForCausalLM.from_pretrained(tmp_path / "masked").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(windows).logits, masked(windows).logits, atol=ATOL, rtol=ATOL)
    prompt = windows[:2, :8]
    a = reloaded.generate(prompt, max_new_tokens=6, do_sample=False)
    b = masked.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b) and a.shape == (2, 14)


def test_compact_model_loads_with_trust_remote_code_without_tyr(tmp_path, windows):
    model = tiny_model("qwen2", num_hidden_layers=3)
    save_compact(model, _layout(model, HEADS, NEURONS), tmp_path / "c")
    code = (
        "import sys, torch; sys.modules['tyr_core'] = None\n"  # importing tyr would fail
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'c')!r}, trust_remote_code=True)\n"
        "print(type(m).__name__, m(torch.tensor([[1, 2, 3]])).logits.shape[-1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["TyrForCausalLM", "128"]


def test_nemotron_export_follows_its_rules_and_refuses_partial_attention(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ExportError, match="layer 0: it keeps 3 of 4 query heads"):
        nemotron_config(model.config, _layout(model, HEADS, NEURONS))
    ok = _layout(model, {1: []}, NEURONS)
    cfg = nemotron_config(model.config, ok)
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    assert cfg["block_configs"][1]["attention"] == {"no_op": True}
    assert cfg["block_configs"][0]["ffn"] == {"no_op": False, "intermediate_size": 100}
    assert cfg["block_configs"][2]["ffn"] == {"no_op": True}
    bad = json.loads(json.dumps(cfg))
    bad["block_configs"][0]["attention"]["n_heads_in_group"] = 3
    with pytest.raises(ExportError, match="layer 0: n_heads_in_group"):
        validate_nemotron(bad)
    save_nemotron(model, ok, tmp_path / "nas")
    assert json.loads((tmp_path / "nas" / "config.json").read_text())["block_configs"] == cfg["block_configs"]
    with pytest.raises(ExportError, match="qwen2"):
        nemotron_config(tiny_model("qwen2").config, _layout(tiny_model("qwen2"), {}, {}))


def test_sparsity_report_is_written(tmp_path):
    model = tiny_model("mistral", num_hidden_layers=3)
    js, png = write_sparsity_report(model.config, _layout(model, HEADS, NEURONS), tmp_path)
    dist = json.loads(js.read_text())
    assert [round(r["attn_sparsity"], 2) for r in dist["layers"]] == [0.25, 1.0, 0.5]
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_an_interrupted_export_leaves_no_folder(tmp_path, monkeypatch):
    model = tiny_model("llama", num_hidden_layers=3)
    import tyr_core.export.compact as compact

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(compact, "_write_compact", boom)
    with pytest.raises(OSError):
        save_compact(model, _layout(model, HEADS, NEURONS), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
