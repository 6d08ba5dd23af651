"""Evaluation: evaluation windows (no BOS, remainder dropped), token-weighted perplexity with known answers, latency
bookkeeping, and the lm-evaluation-harness adapter on a tiny offline task whose accuracy is known in advance."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn
from transformers import PreTrainedTokenizerFast

from tyr_core.errors import CalibrationError
from tyr_core.evaluate import accuracy, latency, lm_eval_tasks, perplexity, text_windows
from tyr_core.export import build_compact_model, masked_model
from tyr_core.sublayer_layout import PrunedSublayer

BOS = 1


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per ASCII character (id = code point, < 128 = the tiny models' vocab); adds BOS unless told not to."""
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": 2} | {chr(c): c for c in range(3, 128)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


class UniformLM(nn.Module):
    """Equal logits for every token: perplexity is exactly the vocabulary size. Records what it was given."""

    def __init__(self, vocab: int):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.config = SimpleNamespace(vocab_size=vocab)
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, **kwargs):
        self.seen.append(input_ids)
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.config.vocab_size))


def half_pruned_layout(model) -> dict:
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    layout = {}
    for layer in range(cfg.num_hidden_layers):
        heads = torch.tensor([[0, 2, 3], [], [1]][layer % 3])
        layout[(layer, "attn")] = PrunedSublayer(heads, torch.randn(64, heads.numel() * 16, generator=g) * 0.1)
        neurons = torch.arange(0, 128, 2)
        layout[(layer, "mlp")] = PrunedSublayer(neurons, torch.randn(64, 64, generator=g) * 0.1)
    return layout


def test_text_windows_join_documents_without_special_tokens_and_drop_the_remainder():
    tok = char_tokenizer()
    assert tok("ab")["input_ids"] == [BOS, 97, 98]  # the tokenizer would add BOS if asked
    windows = text_windows(tok, ["abc", "de"], seq_len=3)  # "abc\n\nde": 7 tokens -> 2 windows, "e" dropped
    assert windows.dtype == torch.long
    assert windows.tolist() == [[97, 98, 99], [10, 10, 100]]
    with pytest.raises(CalibrationError, match="fewer than one window"):
        text_windows(tok, ["ab"], seq_len=3)
    with pytest.raises(CalibrationError, match="at least 2"):
        text_windows(tok, ["abc"], seq_len=1)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size_and_no_bos_is_added():
    lm = UniformLM(vocab=128)
    windows = torch.randint(3, 128, (5, 9), generator=torch.Generator().manual_seed(0))
    assert perplexity(lm, windows, batch_size=2) == pytest.approx(128, rel=1e-6)  # fp32 log-softmax
    assert torch.equal(torch.cat(lm.seen), windows)  # scored as given: no BOS, no overlap, nothing dropped


def test_perplexity_is_the_token_weighted_mean_nll_whatever_the_batch_size(windows):
    model = tiny_model("llama")
    ids = windows[:5, :16]
    with torch.no_grad():
        logits = model(ids).logits
    expected = math.exp(float(F.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))))
    for batch_size in (1, 2, 5):
        assert perplexity(model, ids, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids) != pytest.approx(perplexity(model, windows[5:10, :16]), rel=1e-3)


def test_compact_and_masked_models_have_the_same_perplexity(windows):
    model = tiny_model("qwen2", num_hidden_layers=3)
    layout = half_pruned_layout(model)
    compact, masked = build_compact_model(model, layout), masked_model(model, layout)
    assert perplexity(compact, windows) == pytest.approx(perplexity(masked, windows), rel=1e-5)
    assert perplexity(compact, windows) != pytest.approx(perplexity(model, windows), rel=1e-3)


@pytest.mark.parametrize("shape", [(0, 8), (4, 1), (8,)])
def test_perplexity_refuses_windows_it_cannot_score(shape):
    with pytest.raises(CalibrationError, match="windows must be"):
        perplexity(UniformLM(128), torch.zeros(shape, dtype=torch.long))


class CountingLM(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.config, self.calls = inner, inner.config, []

    def forward(self, input_ids, **kwargs):
        self.calls.append(input_ids.shape[1])
        return self.inner(input_ids, **kwargs)


def test_latency_times_one_prefill_and_gen_len_cached_decode_steps_per_run():
    dense = tiny_model("llama", num_hidden_layers=3)
    lm = CountingLM(build_compact_model(dense, half_pruned_layout(dense)))
    result = latency(lm, prompt_len=12, gen_len=5, batch_size=2, repeats=2)
    # warm-up (prefill + 4 steps), then 2 timed runs of prefill + 5 single-token steps through the cache
    assert lm.calls == [12] + [1] * 4 + ([12] + [1] * 5) * 2
    assert result["prefill_tok_s"] == pytest.approx(2 * 12 / result["ttft_s"])
    assert result["decode_tok_s"] == pytest.approx(2 * 5 / result["decode_s"])
    assert result["ttft_s"] > 0 and result["decode_s"] > 0 and result["device"] == "cpu"


def write_tiny_task(folder) -> str:
    """A 4-question multiple-choice task read from local files (no network)."""
    docs = [
        {"question": "a?", "choices": ["xx", "y", "zzz"], "answer": 1},
        {"question": "b?", "choices": ["p", "qq"], "answer": 0},
        {"question": "c?", "choices": ["rrr", "s"], "answer": 0},
        {"question": "d?", "choices": ["tt", "uuuu"], "answer": 1},
    ]
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "tyr_tiny_mc.yaml").write_text(
        "task: tyr_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return "tyr_tiny_mc"


def test_lm_eval_adapter_runs_a_local_task_on_the_compact_model(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    task = write_tiny_task(tmp_path)
    dense = tiny_model("llama", num_hidden_layers=3)
    layout = half_pruned_layout(dense)
    compact = build_compact_model(dense, layout)
    with torch.no_grad():
        compact.lm_head.weight.zero_()  # every token -log(128): the shortest choice wins, the first on ties
    results = lm_eval_tasks(compact, char_tokenizer(), [task], include_path=tmp_path)
    # the shortest choice is the answer in questions a and b, not in c and d
    assert accuracy(results) == {task: 0.5}
    assert results[task]["acc_norm,none"] == 0.5  # per-character normalisation makes every choice tie: choice 0
    masked = masked_model(dense, layout)
    real = {
        name: lm_eval_tasks(m, char_tokenizer(), [task], include_path=tmp_path)
        for name, m in (("compact", build_compact_model(dense, layout)), ("masked", masked))
    }
    assert real["compact"][task] == real["masked"][task]
