"""Calibration chunkings, configuration validation and bad input: each error names the thing that is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tyr_core.calibration import load_documents, packed_windows, reference_chunks, tokenize
from tyr_core.config import CalibrationConfig, PruneConfig, apply_overrides, validate
from tyr_core.errors import CalibrationError, ConfigError, ModelNotFoundError, UnsupportedModelError
from tyr_core.families import resolve_model
from tyr_core.layerwise import LayerwiseModel


def test_reference_chunking_keeps_tails_and_stops_at_the_budget():
    docs = [list(range(10)), list(range(100, 107)), list(range(200, 230))]
    pieces = reference_chunks(docs, seq_len=4, num_tokens=20)
    assert [p.tolist() for p in pieces[:4]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [100, 101, 102, 103]]
    assert sum(p.numel() for p in pieces) == 20


def test_packed_windows_are_seeded_and_non_overlapping():
    docs = [list(range(i * 50, i * 50 + 50)) for i in range(4)]
    a = packed_windows(docs, 16, 5, seed=3, sep=None)
    b = packed_windows(docs, 16, 5, seed=3, sep=None)
    c = packed_windows(docs, 16, 5, seed=4, sep=None)
    assert a.shape == (5, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a.flatten().tolist())) == 80  # no token twice: windows do not overlap
    with pytest.raises(CalibrationError, match="fewer than one window"):
        packed_windows([[1, 2]], 16, 5, seed=0, sep=None)


def _byte_level_bpe(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="Ā")


def test_batched_tokenisation_equals_one_document_at_a_time_and_stays_lazy():
    docs = [f"Act {i}. Enter   Hamlet;\n\n  ‘To be, or not’ — {i * 7919} ñ 字\t" * (1 + i % 5) for i in range(60)]
    tok = _byte_level_bpe(docs)
    one_by_one = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    assert list(tokenize(tok, docs, batch_chars=500)) == one_by_one  # many batches
    assert list(tokenize(tok, docs)) == one_by_one  # one batch

    def stream():  # reference chunking must stop reading once it has its tokens (a streamed dataset is endless)
        yield from docs[:10]
        raise AssertionError("read past what reference chunking needed")

    pieces = reference_chunks(tokenize(tok, stream(), batch_chars=50), seq_len=8, num_tokens=64)
    assert sum(p.numel() for p in pieces) == 64


def test_a_streamed_dataset_is_read_only_as_far_as_reference_chunking_needs(monkeypatch):
    import datasets

    from tyr_core.pipeline import calibration_windows

    def shard():  # a FineWeb-Edu shard holds gigabytes; calibration needs its first num_windows * seq_len tokens
        for i in range(300):  # 3 MB: tokenisation reads one batch (1 MB) ahead, not the shard
            yield {"text": f"document {i} about the weather in Elsinore, " * 250}
        raise AssertionError("read past what reference chunking needed")

    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: shard())
    tok = _byte_level_bpe([f"document {i} about the weather in Elsinore, " for i in range(40)])
    cfg = CalibrationConfig(dataset="HuggingFaceFW/fineweb-edu", chunking="reference", seq_len=16, num_windows=8)
    assert calibration_windows(cfg, tok).shape == (8, 16)


def test_local_text_json_and_parquet_files_load_as_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line of the same document\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "doc one"}) + "\n" + json.dumps({"text": "doc two"}))
    assert load_documents([str(tmp_path / "a.txt")]) == ["first line\nsecond line of the same document\n"]
    assert load_documents([str(tmp_path / "b.jsonl")]) == ["doc one", "doc two"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x y z", "w"]}), tmp_path / "c.parquet")
    assert load_documents([str(tmp_path / "c.parquet")]) == ["x y z", "w"]


def test_empty_or_missing_calibration_data_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(CalibrationError, match="no non-empty text"):
        load_documents([str(tmp_path / "empty.txt")])
    with pytest.raises(CalibrationError, match="does not exist"):
        load_documents([str(tmp_path / "nope.txt")])
    (tmp_path / "w.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(CalibrationError, match="'text'"):
        load_documents([str(tmp_path / "w.jsonl")])


def test_unknown_config_field_and_bad_values_are_named():
    with pytest.raises(ConfigError, match="target_sparsty"):
        validate(PruneConfig, {"target_sparsty": 0.5})
    with pytest.raises(ConfigError, match="target_sparsity"):
        validate(PruneConfig, {"target_sparsity": 1.5})
    with pytest.raises(ConfigError, match="num_levels"):
        validate(PruneConfig, {"num_levels": 8})
    with pytest.raises(ConfigError, match="calibration.files or calibration.dataset"):
        validate(CalibrationConfig, {}, "calibration")


def test_overrides_are_dotted_and_typed():
    out = apply_overrides({"prune": {"target_sparsity": 0.5}}, ["prune.target_sparsity=0.25", "search.offspring=4"])
    assert out == {"prune": {"target_sparsity": 0.25}, "search": {"offspring": 4}}
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides({}, ["oops"])


def test_unsupported_architecture_is_named(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*llama"):
        LayerwiseModel(tmp_path)


def test_missing_model_path_and_folder_without_weights(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelNotFoundError, match="no \\*.safetensors.*never unpickles"):
        resolve_model(tmp_path)


def test_truncated_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    with pytest.raises(ModelNotFoundError, match="could not be read"):
        resolve_model(bad, cache_dir=tmp_path / "cache")


class _SpyTokenizer:
    """A tokenizer that records every text it is handed."""

    def __init__(self, tok):
        self.tok, self.texts = tok, []
        self.eos_token_id = tok.eos_token_id

    def __call__(self, texts, **kwargs):
        self.texts += [texts] if isinstance(texts, str) else list(texts)
        return self.tok(texts, **kwargs)


def _old_packed(token_docs, seq_len, num_windows, seed, sep):
    """Packed chunking as it was specified: the whole stream in memory, seeded shuffle of all its windows."""
    import numpy as np

    stream = [t for ids in token_docs for t in ids + ([sep] if sep is not None else [])]
    n = len(stream) // seq_len
    windows = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return windows[torch.from_numpy(np.random.default_rng(seed).permutation(n)[:num_windows])]


def test_packed_windows_stream_into_a_fixed_buffer_and_stop_reading_once_it_is_full():
    docs = [list(range(i * 50, i * 50 + 50)) for i in range(40)]  # 2,000 tokens
    for sep in (None, 9999):  # a text that fits: the windows of the whole text, as always
        assert torch.equal(packed_windows(docs, 16, 5, seed=3, sep=sep), _old_packed(docs, 16, 5, 3, sep))
    assert packed_windows(docs, 16, 5, seed=3, sep=None).dtype == torch.long

    def endless():  # a corpus larger than memory: windows come from its first max_tokens tokens
        yield from docs
        raise AssertionError("read past the buffer")

    a = packed_windows(endless(), 16, 5, seed=3, sep=None, max_tokens=1000)
    assert torch.equal(a, _old_packed(docs[:20], 16, 5, 3, None))
    # the buffer always holds the windows asked for
    assert packed_windows(endless(), 16, 70, seed=0, sep=None, max_tokens=100).shape == (70, 16)


def test_a_long_text_file_is_read_and_tokenised_in_pieces_cut_after_a_line_break(tmp_path, monkeypatch):
    from tyr_core import calibration
    from tyr_core.calibration import iter_documents, iter_pieces
    from tyr_core.pipeline import calibration_windows

    lines = [f"Enter Hamlet {i}, reading.\r\n" if i % 7 else f"{'x' * 90}\n" for i in range(4000)]
    big = tmp_path / "big.txt"
    big.write_bytes("".join(lines).encode())
    text = "".join(lines).replace("\r\n", "\n")  # universal newlines, as datasets reads a .txt document
    pieces = list(iter_pieces([str(big)], piece_chars=1000))
    assert "".join(p for p, _ in pieces) == text
    assert [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(len(p) <= 1000 and p.endswith("\n") for p, _ in pieces)
    assert list(iter_documents([str(big)])) == [text]  # whole documents where a caller asks for them

    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("Act one.\n" * 50)
    (small / "b.txt").write_text("Act two.\n" * 50)
    tok = _byte_level_bpe([text[:20000]])
    cfg = CalibrationConfig(files=[str(small)], seq_len=16, num_windows=4)
    docs = [tok(p.read_text(), add_special_tokens=False)["input_ids"] for p in sorted(small.iterdir())]
    assert torch.equal(calibration_windows(cfg, tok), _old_packed(docs, 16, 4, 0, tok.eos_token_id))

    monkeypatch.setattr(calibration, "PIECE_CHARS", 2000)
    monkeypatch.setattr(calibration, "STREAM_TOKENS", 3000)
    spy = _SpyTokenizer(tok)
    windows = calibration_windows(cfg.model_copy(update={"files": [str(big)]}), spy)
    assert windows.shape == (4, 16)
    assert max(map(len, spy.texts)) <= 2000  # never the whole document at once
    assert sum(map(len, spy.texts)) < len(text) // 2  # and it stopped reading once the buffer was full


def test_held_out_windows_are_read_only_as_far_as_max_windows_needs():
    from tyr_core.calibration import eval_windows, heldout_windows

    docs = [f"Scene {i}. The ghost walks at midnight,\nand Horatio speaks to it.\n" * 40 for i in range(20)]
    tok = _byte_level_bpe(docs)
    ids = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    whole = torch.tensor(ids[: len(ids) // 16 * 16]).view(-1, 16)
    assert torch.equal(eval_windows(tok, docs, 16), whole)
    assert torch.equal(eval_windows(tok, docs, 16, max_windows=5), whole[:5])
    pieces = [(d, True) for d in docs]
    assert torch.equal(heldout_windows(tok, pieces, 16, max_windows=5, piece_chars=500), whole[:5])

    def stream():
        yield from pieces[:2]
        raise AssertionError("read past what max_windows needed")

    spy = _SpyTokenizer(tok)
    assert torch.equal(heldout_windows(spy, stream(), 16, max_windows=3, piece_chars=500), whole[:3])
    assert max(map(len, spy.texts)) <= 500
