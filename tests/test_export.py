"""Exports on tiny random models of every family: compact == masked logits, honest parameter counts, smaller files,
reload round trips (with and without trust_remote_code), generate(), Nemotron-NAS rules and refusals, the report.

Tolerance: compact and masked models compute the same sums in a different order (fewer, zero-free terms), so fp32
logits agree to ATOL = RTOL = 1e-5; the negative controls show that a wrong head map or layout misses by far more.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, tiny_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from tyr_core.errors import ExportError
from tyr_core.export import (
    TyrConfig,
    TyrForCausalLM,
    build_compact_model,
    check_layout,
    compact_config,
    ffn_mult_width,
    masked_model,
    nemotron_config,
    save_compact,
    save_masked,
    save_nemotron,
    sparsity_distribution,
    validate_nemotron,
    write_sparsity_report,
)
from tyr_core.param_count import count_module_params, dense_params, layout_params
from tyr_core.sublayer_layout import PrunedSublayer

ATOL = RTOL = 1e-5

# layer 0: heads pruned unevenly across the 2 KV groups (group 0 keeps head 0, group 1 keeps 2 and 3), narrower MLP;
# layer 1: attention removed entirely; layer 2: a whole KV group gone (heads 2, 3 kept) and the MLP removed entirely
HEADS = {0: [0, 2, 3], 1: [], 2: [2, 3]}
NEURONS = {0: 100, 1: 64, 2: 0}


def make_layout(model, heads: dict[int, list[int]], neurons: dict[int, int], seed: int = 0) -> dict:
    """Kept query heads and neuron counts per layer (default: all); refitted weights random of the right shape."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    layout = {}
    for layer in range(cfg.num_hidden_layers):
        kept = torch.tensor(heads.get(layer, list(range(cfg.num_attention_heads))), dtype=torch.long)
        weight = torch.randn(cfg.hidden_size, kept.numel() * cfg.head_dim, generator=g) * 0.1
        layout[(layer, "attn")] = PrunedSublayer(kept, weight)
        n = neurons.get(layer, cfg.intermediate_size)
        kept_n = torch.sort(torch.randperm(cfg.intermediate_size, generator=g)[:n]).values
        layout[(layer, "mlp")] = PrunedSublayer(kept_n, torch.randn(cfg.hidden_size, n, generator=g) * 0.1)
    return layout


def randomise_biases(model) -> None:
    """transformers initialises biases to zero; random ones make a dropped or misplaced bias visible."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)


def logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


def assert_same_logits(a, b, ids: torch.Tensor) -> None:
    torch.testing.assert_close(logits(a, ids), logits(b, ids), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_model_computes_the_masked_model_with_the_accounted_parameters(family, windows):
    model = tiny_model(family, num_hidden_layers=3)
    layout = make_layout(model, HEADS, NEURONS)
    masked, compact = masked_model(model, layout), build_compact_model(model, layout)
    assert_same_logits(compact, masked, windows)
    accounted = layout_params(model.config, layout)
    assert count_module_params(compact) == accounted["total"] < dense_params(model.config)["total"]
    assert count_module_params(masked) == count_module_params(model) == accounted["dense_total"]
    attn = [layer.self_attn if layer.has_attn else None for layer in compact.model.layers]
    assert (attn[0].q_proj.out_features, attn[0].k_proj.out_features) == (3 * 16, 2 * 16)  # both KV heads read
    assert attn[0].kv_map == [0, 1, 1] and attn[1] is None  # head 0 -> KV 0, heads 2, 3 -> KV 1
    assert (attn[2].k_proj.out_features, attn[2].kv_map) == (16, [0, 0])  # KV group 0 lost all its heads
    assert not compact.model.layers[2].has_mlp and compact.model.layers[0].mlp.down_proj.in_features == 100


def test_the_comparison_detects_a_wrong_head_to_kv_map_or_a_wrong_layout(windows):
    """Negative controls: the tolerance above is far tighter than the error of a plausible bug."""
    model = tiny_model("llama", num_hidden_layers=3)
    layout = make_layout(model, HEADS, NEURONS)
    masked, compact = masked_model(model, layout), build_compact_model(model, layout)
    compact.model.layers[0].self_attn.kv_map = [0, 0, 1]  # as if head 2 read KV head 0 (uniform grouping)
    assert (logits(compact, windows) - logits(masked, windows)).abs().max() > 1e-2
    other = build_compact_model(model, make_layout(model, HEADS, NEURONS, seed=1))  # other refitted weights
    assert (logits(other, windows) - logits(masked, windows)).abs().max() > 1e-2


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_dense_parameter_accounting_matches_the_transformers_model(family, tied):
    model = tiny_model(family, tie_word_embeddings=tied)
    assert dense_params(model.config)["total"] == count_module_params(model)
    full = make_layout(model, {}, {})
    assert layout_params(model.config, full)["removed"] == 0
    assert count_module_params(build_compact_model(model, full)) == count_module_params(model)


def test_llama_with_attention_and_mlp_biases_keeps_dropped_sublayers_output_biases(windows, tmp_path):
    model = tiny_model("llama", num_hidden_layers=3, attention_bias=True, mlp_bias=True)
    randomise_biases(model)
    layout = make_layout(model, HEADS, NEURONS)
    save_compact(model, layout, tmp_path / "c")
    compact = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    assert compact.model.layers[1].attn_output_bias.abs().sum() > 0  # o_proj's bias, attention gone
    assert_same_logits(compact, masked_model(model, layout), windows)
    assert count_module_params(compact) == layout_params(model.config, layout)["total"]
    assert dense_params(model.config)["total"] == count_module_params(model)


def test_tied_embeddings_and_llama3_rope_scaling_survive_save_and_reload(windows, tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,  # shorter than the windows, so the scaling matters
    }
    model = tiny_model("llama", num_hidden_layers=3, tie_word_embeddings=True, rope_parameters=rope)
    layout = make_layout(model, HEADS, NEURONS)
    save_compact(model, layout, tmp_path / "c")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    assert reloaded.config.rope_parameters["rope_type"] == "llama3"
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert count_module_params(reloaded) == layout_params(model.config, layout)["total"]
    assert_same_logits(reloaded, masked_model(model, layout), windows)
    default_rope = tiny_model("llama", num_hidden_layers=3, tie_word_embeddings=True)
    assert (logits(build_compact_model(default_rope, layout), windows) - logits(reloaded, windows)).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_compact_model_reloads_generates_and_is_smaller_than_the_masked_one(family, windows, tmp_path):
    model = tiny_model(family, num_hidden_layers=3)
    layout = make_layout(model, HEADS, NEURONS)
    save_compact(model, layout, tmp_path / "compact")
    save_masked(model, layout, tmp_path / "masked")
    size = {k: (tmp_path / k / "model.safetensors").stat().st_size for k in ("compact", "masked")}
    assert size["compact"] < 0.8 * size["masked"]
    assert not (tmp_path / "compact" / "model.safetensors").read_bytes().count(b"model.layers.1.self_attn")
    compact = AutoModelForCausalLM.from_pretrained(tmp_path / "compact").eval()
    masked = AutoModelForCausalLM.from_pretrained(tmp_path / "masked").eval()
    assert isinstance(compact, TyrForCausalLM) and type(masked) is type(model)
    assert_same_logits(compact, masked, windows)
    prompt = windows[:2, :8]
    greedy = {"max_new_tokens": 6, "do_sample": False}
    a, b = compact.generate(prompt, **greedy), masked.generate(prompt, **greedy)
    assert torch.equal(a, b) and a.shape == (2, 14)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batched_generation_with_left_padding_matches_the_masked_model(family, windows):
    model = tiny_model(family, num_hidden_layers=3)
    layout = make_layout(model, HEADS, NEURONS)
    compact, masked = build_compact_model(model, layout), masked_model(model, layout)
    prompt = windows[:3, :10].clone()
    attention_mask = torch.ones_like(prompt)
    attention_mask[0, :4] = 0  # left padding of different lengths
    attention_mask[1, :1] = 0
    greedy = {"attention_mask": attention_mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    a, b = compact.generate(prompt, **greedy), masked.generate(prompt, **greedy)
    assert torch.equal(a, b)
    out = logits(compact, prompt, attention_mask=attention_mask)
    torch.testing.assert_close(
        out[attention_mask.bool()],
        logits(masked, prompt, attention_mask=attention_mask)[attention_mask.bool()],
        atol=ATOL,
        rtol=RTOL,
    )
    assert torch.isfinite(out).all()


def test_compact_model_loads_with_trust_remote_code_where_tyr_cannot_be_imported(tmp_path, windows):
    model = tiny_model("qwen3", num_hidden_layers=3)
    layout = make_layout(model, HEADS, NEURONS)
    save_compact(model, layout, tmp_path / "c")
    torch.save(windows[:4], tmp_path / "ids.pt")
    code = (
        "import sys, torch; sys.modules['tyr_core'] = None\n"  # any import of tyr fails
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'c')!r}, trust_remote_code=True).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(ids).logits, {str(tmp_path / 'out.pt')!r})\n"
        "    print(type(m).__module__.split('.')[0], type(m).__name__, m.generate(ids[:1, :4], max_new_tokens=3,"
        " do_sample=False).shape[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["transformers_modules", "TyrForCausalLM", "7"]
    expected = logits(masked_model(model, layout), windows[:4])
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=ATOL, rtol=RTOL)


def test_sliding_window_attention_matches_mistral_including_generation_past_the_window(windows):
    model = tiny_model("mistral", num_hidden_layers=3, sliding_window=8)
    layout = make_layout(model, HEADS, NEURONS)
    compact, masked = build_compact_model(model, layout), masked_model(model, layout)
    assert compact.config.layer_sliding_window == [8, 8, 8]
    assert_same_logits(compact, masked, windows)
    greedy = {"max_new_tokens": 12, "do_sample": False}
    assert torch.equal(compact.generate(windows[:2, :6], **greedy), masked.generate(windows[:2, :6], **greedy))
    unwindowed = build_compact_model(tiny_model("mistral", num_hidden_layers=3, sliding_window=None), layout)
    assert (logits(unwindowed, windows) - logits(compact, windows)).abs().max() > 1e-3


def test_qwen2_sliding_layers_follow_layer_types():
    model = tiny_model("qwen2", num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    config = compact_config(model.config, make_layout(model, HEADS, NEURONS))
    assert config.layer_sliding_window == [None, 8, 8]


def test_cached_decoding_matches_the_full_forward_when_layer_0_has_no_attention(windows):
    model = tiny_model("qwen3", num_hidden_layers=3)
    layout = make_layout(model, {0: [], 2: [1, 2]}, NEURONS)  # the cache's layer 0 only ever holds empty entries
    compact = build_compact_model(model, layout)
    ids = windows[:2, :12]
    full = logits(compact, ids)
    with torch.no_grad():  # token by token through the KV cache
        out = compact(ids[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 12):
            out = compact(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=RTOL)
    greedy = {"max_new_tokens": 5, "do_sample": False}
    assert torch.equal(
        compact.generate(ids[:, :6], **greedy), masked_model(model, layout).generate(ids[:, :6], **greedy)
    )


def test_eager_attention_matches_sdpa(windows, tmp_path, monkeypatch):
    model = tiny_model("llama", num_hidden_layers=3, sliding_window=None)
    layout = make_layout(model, HEADS, NEURONS)
    save_compact(model, layout, tmp_path / "c")
    sdpa = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    eager = AutoModelForCausalLM.from_pretrained(tmp_path / "c", attn_implementation="eager").eval()
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    expected = logits(sdpa, windows[:4])

    def no_sdpa(*_args, **_kwargs):
        raise AssertionError("the eager path called SDPA")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    torch.testing.assert_close(logits(eager, windows[:4]), expected, atol=ATOL, rtol=RTOL)


def test_every_query_may_attend_to_at_least_one_key_even_when_padded():
    from tyr_core.export.modeling_tyr import _attention_mask

    padding = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    for past, window in ((0, None), (0, 2), (2, None)):
        q_len = 5 - past
        mask = _attention_mask(padding, q_len, past, window, torch.device("cpu"))
        assert mask.shape == (2, 1, q_len, 5) and bool(mask.any(dim=-1).all())  # SDPA gives NaN for empty rows
        real_queries = [pos - past for pos in (3, 4)]
        assert not bool(mask[0, 0, real_queries, :3].any())  # a real token never sees padding
    assert _attention_mask(None, 5, 0, None, torch.device("cpu")) is None  # plain causal: SDPA's fast path


def test_bf16_model_gives_a_bf16_compact_model_with_the_refit_cast(windows):
    model = tiny_model("llama", num_hidden_layers=3).to(torch.bfloat16)
    layout = make_layout(model, HEADS, NEURONS)  # fp32 refitted weights, as the supernet stores them
    compact = build_compact_model(model, layout)
    assert {p.dtype for p in compact.parameters()} == {torch.bfloat16}
    assert compact.config.dtype == torch.bfloat16
    reference = logits(masked_model(model, layout), windows).float()
    diff = (logits(compact, windows).float() - reference).abs()
    # The same bf16 weights and ops; only the order of the sums over the kept heads and neurons differs, so a logit
    # may round to a neighbouring bf16 value: two units in the last place of the largest logit (bf16 keeps 8
    # significant bits; measured: one). The logits spread ~0.16, so the old 0.1 would have hidden a lost neuron.
    ulp = 2.0 ** (torch.ceil(torch.log2(reference.abs().max())).item() - 8)
    assert diff.max() <= 2 * ulp


def test_layouts_that_do_not_fit_the_model_are_refused_naming_the_sublayer():
    model = tiny_model("llama", num_hidden_layers=3)
    layout = make_layout(model, HEADS, NEURONS)
    missing = {k: v for k, v in layout.items() if k != (2, "mlp")}
    with pytest.raises(ExportError, match="layer 2 mlp"):
        build_compact_model(model, missing)
    unsorted = dict(layout)
    unsorted[(0, "attn")] = PrunedSublayer(torch.tensor([2, 0, 3]), layout[(0, "attn")].weight)
    with pytest.raises(ExportError, match="layer 0 attn: kept indices must be sorted"):
        masked_model(model, unsorted)
    wrong = dict(layout)
    wrong[(1, "mlp")] = PrunedSublayer(layout[(1, "mlp")].kept, torch.zeros(64, 3))
    with pytest.raises(ExportError, match=r"layer 1 mlp: refitted weight has shape \(64, 3\), expected \(64, 64\)"):
        check_layout_of(model, wrong)


def check_layout_of(model, layout) -> None:
    from tyr_core.families import geometry

    check_layout(geometry(model.config), layout)


def test_config_rejects_inconsistent_per_layer_shapes():
    with pytest.raises(ValueError, match="layer 0: layer_kv_map"):
        TyrConfig(
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            hidden_size=32,
            layer_heads=[2],
            layer_kv_heads=[2],
            layer_kv_map=[[1, 1]],
        )
    with pytest.raises(ValueError, match="layer_intermediate has 2 entries for 1 layers"):
        TyrConfig(num_hidden_layers=1, layer_intermediate=[4, 4])


def test_an_interrupted_export_leaves_no_folder_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import tyr_core.export.compact as compact

    model = tiny_model("llama", num_hidden_layers=3)
    layout = make_layout(model, HEADS, NEURONS)

    def disk_full(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(compact, "_write_compact", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_compact(model, layout, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save_compact(model, layout, tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    monkeypatch.setattr(compact, "_write_compact", disk_full)
    with pytest.raises(OSError):
        save_compact(model, layout, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- Nemotron-NAS ---------------------------------------------------------------------------------------------

EXPRESSIBLE_HEADS = {1: []}  # layer 1's attention removed, the others whole


def tyr_model_from_nemotron(folder) -> TyrForCausalLM:
    """Read a Nemotron-NAS checkpoint as vLLM's DeciLM would build it (global query heads, per-layer KV heads and
    widths, no_op blocks without tensors), by strict loading into the equivalent per-layer model."""
    cfg = json.loads((folder / "config.json").read_text())
    heads, blocks = cfg["num_attention_heads"], cfg["block_configs"]
    kv = [0 if b["attention"]["no_op"] else heads // b["attention"]["n_heads_in_group"] for b in blocks]
    config = TyrConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        head_dim=cfg["head_dim"],
        rms_norm_eps=cfg["rms_norm_eps"],
        max_position_embeddings=cfg["max_position_embeddings"],
        rope_parameters=cfg["rope_parameters"],
        qkv_bias=cfg["qkv_bias"],
        o_bias=cfg["attention_bias"],
        mlp_bias=cfg["mlp_bias"],
        layer_heads=[0 if k == 0 else heads for k in kv],
        layer_kv_heads=kv,
        layer_kv_map=[[h // (heads // k) for h in range(heads)] if k else [] for k in kv],
        layer_intermediate=[0 if b["ffn"]["no_op"] else b["ffn"]["intermediate_size"] for b in blocks],
        tie_word_embeddings=cfg["tie_word_embeddings"],
    )
    model = TyrForCausalLM(config).eval()
    state = load_file(folder / "model.safetensors")
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_nemotron_checkpoint_has_the_weights_its_block_configs_describe(family, windows, tmp_path):
    model = tiny_model(family, num_hidden_layers=3, tie_word_embeddings=family == "qwen2")
    layout = make_layout(model, EXPRESSIBLE_HEADS, NEURONS)
    save_nemotron(model, layout, tmp_path / "nas")
    cfg = json.loads((tmp_path / "nas" / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    assert cfg["block_configs"] == [
        {"attention": {"no_op": False, "n_heads_in_group": 2}, "ffn": {"no_op": False, "intermediate_size": 100}},
        {"attention": {"no_op": True}, "ffn": {"no_op": False, "intermediate_size": 64}},
        {"attention": {"no_op": False, "n_heads_in_group": 2}, "ffn": {"no_op": True}},
    ]
    assert (cfg["attention_bias"], cfg["qkv_bias"]) == (False, family == "qwen2")
    names = load_file(tmp_path / "nas" / "model.safetensors").keys()
    assert not [n for n in names if n.startswith(("model.layers.1.self_attn", "model.layers.1.input_layernorm"))]
    assert ("lm_head.weight" in names) == (family == "llama")
    assert_same_logits(tyr_model_from_nemotron(tmp_path / "nas"), masked_model(model, layout), windows)


def test_nemotron_shipped_config_class_gives_vllm_exact_widths(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    save_nemotron(model, make_layout(model, EXPRESSIBLE_HEADS, NEURONS), tmp_path / "nas")
    config = AutoConfig.from_pretrained(tmp_path / "nas", trust_remote_code=True)
    ffn, attn = config.block_configs[0].ffn, config.block_configs[1].attention
    # vLLM's DeciLMDecoderLayer: `if hasattr(block_config.ffn, "ffn_mult")` ... else `ffn.intermediate_size`
    assert not hasattr(ffn, "ffn_mult") and ffn.intermediate_size == 100 and ffn.no_op is False
    assert attn.no_op is True and config.block_configs[0].attention.n_heads_in_group == 2
    assert (
        config.to_dict()["block_configs"] == json.loads((tmp_path / "nas" / "config.json").read_text())["block_configs"]
    )


def test_nemotron_refuses_uneven_and_partial_attention_naming_the_layer():
    model = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ExportError, match=r"layer 0: its attention keeps 3 of 4 query heads \(unevenly across KV"):
        nemotron_config(model.config, make_layout(model, HEADS, NEURONS))
    with pytest.raises(ExportError, match=r"layer 2: its attention keeps 2 of 4 query heads \(in whole"):
        nemotron_config(model.config, make_layout(model, {2: [2, 3]}, NEURONS))


@pytest.mark.parametrize(
    ("family", "overrides", "message"),
    [
        ("qwen3", {}, "Qwen3"),
        ("mistral", {"sliding_window": 8}, "sliding-window"),
        ("llama", {"hidden_act": "gelu"}, "SiLU"),
        ("llama", {"attention_bias": True}, "layer 1: its attention is removed but o_proj's bias"),
    ],
)
def test_nemotron_refuses_models_the_format_cannot_express(family, overrides, message):
    model = tiny_model(family, num_hidden_layers=3, **overrides)
    with pytest.raises(ExportError, match=message):
        nemotron_config(model.config, make_layout(model, EXPRESSIBLE_HEADS, NEURONS))


def test_nemotron_ffn_mult_mode_writes_multiples_of_256_and_refuses_other_widths():
    assert ffn_mult_width(1.3125, 8192) == 7168  # Llama-3.1-Nemotron-51B's value gives a multiple of 256
    model = tiny_model("llama", num_hidden_layers=3, intermediate_size=512)
    cfg = nemotron_config(model.config, make_layout(model, {}, {0: 256, 1: 512, 2: 0}), ffn_width="ffn_mult")
    mults = [b["ffn"].get("ffn_mult") for b in cfg["block_configs"]]
    assert [ffn_mult_width(m, 64) for m in mults[:2]] == [256, 512] and mults[2] is None
    with pytest.raises(ExportError, match="layer 1: it keeps 100 MLP neurons"):
        nemotron_config(model.config, make_layout(model, {}, {1: 100}), ffn_width="ffn_mult")


def _valid_nemotron() -> dict:
    model = tiny_model("llama", num_hidden_layers=3)
    return nemotron_config(model.config, make_layout(model, EXPRESSIBLE_HEADS, NEURONS))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["block_configs"][0]["attention"].update(n_heads_in_group=3), "layer 0: attention.n_heads_in"),
        (lambda c: c["block_configs"][2]["attention"].pop("no_op"), "layer 2: attention.no_op"),
        (lambda c: c["block_configs"][1]["ffn"].update(ffn_mult=1.0), "layer 1: an active ffn needs exactly one"),
        (lambda c: c["block_configs"][0]["ffn"].pop("intermediate_size"), "layer 0: an active ffn needs exactly"),
        (lambda c: c["block_configs"][0]["ffn"].update(intermediate_size=0), "layer 0: ffn.intermediate_size"),
        (lambda c: c["block_configs"][2]["ffn"].update(replace_with_linear=True), "layer 2: ffn.replace_with_lin"),
        (lambda c: c["block_configs"].pop(), "one block per layer: 2 for 3"),
        (lambda c: c.update(model_type="llama"), "model_type"),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act must be silu"),
        (lambda c: [b["attention"].update(no_op=True) for b in c["block_configs"]], "every attention block"),
        (lambda c: c["block_configs"][0]["attention"].update(no_op=True), "layer 0: the first non-empty block"),
    ],
)
def test_nemotron_validator_enforces_the_format_rules(mutate, message):
    cfg = _valid_nemotron()
    validate_nemotron(cfg)
    mutate(cfg)
    with pytest.raises(ExportError, match=message):
        validate_nemotron(cfg)


# --- sparsity report ------------------------------------------------------------------------------------------


def test_sparsity_report_is_written_with_per_layer_sparsity_and_parameters(tmp_path):
    model = tiny_model("mistral", num_hidden_layers=3)
    layout = make_layout(model, HEADS, NEURONS)
    json_path, png_path = write_sparsity_report(model.config, layout, tmp_path / "report")
    dist = json.loads(json_path.read_text())
    assert dist == json.loads(json.dumps(sparsity_distribution(model.config, layout)))
    assert [r["attn_sparsity"] for r in dist["layers"]] == [0.25, 1.0, 0.5]
    assert [r["mlp_sparsity"] for r in dist["layers"]] == [1 - 100 / 128, 0.5, 1.0]
    assert [r["attn_kv_heads_kept"] for r in dist["layers"]] == [2, 0, 1]
    per_layer = layout_params(model.config, layout)["per_layer"]
    assert [r["attn_params"] for r in dist["layers"]] == [p["attn"] for p in per_layer]
    assert dist["params_total"] == count_module_params(build_compact_model(model, layout))
    assert png_path.read_bytes()[:4] == b"\x89PNG" and png_path.stat().st_size > 1000
