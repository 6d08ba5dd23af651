"""GGUF for llama.cpp (and Ollama, LM Studio, llama-cpp-python): one file, per-layer heads and widths, no converter.

llama.cpp runs per-layer query heads, KV heads and FFN widths in its ``deci`` architecture (the one Nemotron-NAS
converts to): it reads ``deci.attention.head_count``, ``deci.attention.head_count_kv`` and
``deci.feed_forward_length`` as per-layer arrays, 0 meaning the sublayer is gone. Its graph (``src/models/deci.cpp``)
has four rules that shape what we write, each met exactly (the extra weights are zeros that add nothing):

* query head ``h`` reads KV head ``h // (n_head / n_head_kv)``: when the kept heads are uneven across KV groups,
  every group is padded to the largest with zero query heads (zero q rows, zero o_proj columns);
* a layer with attention but no FFN skips the attention's output, and the last layer must reach its FFN for the
  output rows to be selected: such a layer keeps a one-neuron FFN of zeros;
* the head size is read from layer 0's head count: a layer 0 without attention keeps one zero head (as does a removed
  attention whose o_proj bias must still be added);
* its RoPE rotates consecutive pairs, so q and k rows are permuted per head from transformers' half-split order.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..families import Geometry, geometry
from ..sublayer_layout import PrunedLayout
from .compact import atomic_write, check_layout, compact_state_dict, kept_kv_heads
from .nemotron import check_deci_model

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

GgufType = Literal["f32", "f16", "q8_0"]
Q8_0_BLOCK = 32  # values per q8_0 block: a row whose length is not a multiple stays f16, as llama-quantize does
ARCH = "deci"
FILE_NAME = "model.gguf"


@dataclass(frozen=True)
class GgufLayer:
    """What one decoder layer becomes in the GGUF.

    Attributes:
        query_heads: per written query head, its position in the layout's kept heads, or -1 for a zero head.
        kv_heads: per written KV head, its position among the kept KV heads, or -1 for a zero head.
        neurons: written FFN width: the kept neurons, or 1 for a zero neuron, or 0 when the FFN is gone.
        kept_neurons: the layout's kept neurons (0 with ``neurons == 1`` is a zero neuron).
    """

    query_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    neurons: int
    kept_neurons: int

    @property
    def zero_ffn(self) -> bool:
        return self.neurons == 1 and self.kept_neurons == 0


def gguf_layers(geo: Geometry, layout: PrunedLayout) -> list[GgufLayer]:
    """The per-layer shapes llama.cpp's ``deci`` graph runs exactly for ``layout`` (see the module docstring)."""
    check_layout(geo, layout)
    out = []
    for layer in range(geo.num_layers):
        kept = layout[(layer, "attn")].kept.long()
        if kept.numel():
            kv = kept_kv_heads(geo, kept).tolist()
            members = [[i for i, h in enumerate(kept.tolist()) if h // geo.heads_per_kv == g] for g in kv]
            width = max(len(m) for m in members)
            query = tuple(i for m in members for i in m + [-1] * (width - len(m)))
            kv_heads = tuple(range(len(kv)))
        elif layer == 0 or geo.o_bias:
            query, kv_heads = (-1,), (-1,)
        else:
            query, kv_heads = (), ()
        kept_neurons = int(layout[(layer, "mlp")].kept.numel())
        needs_ffn = bool(query) or layer == geo.num_layers - 1 or geo.mlp_bias
        neurons = kept_neurons or (1 if needs_ffn else 0)
        out.append(GgufLayer(query, kv_heads, neurons, kept_neurons))
    return out


def _check_model(config: PretrainedConfig, geo: Geometry) -> None:
    check_deci_model(config, geo, "the gguf export", "llama.cpp's deci architecture")
    rope_type = dict(config.rope_parameters).get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise ExportError(
            f"the gguf export writes default and llama3 RoPE only, not rope_type={rope_type!r}; use the compact export"
        )


def _pairwise_rope(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers rotates (i, i + d/2) within a head, llama.cpp's normal RoPE (2i, 2i+1): reorder each head."""
    if heads == 0:
        return rows
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _heads(rows: torch.Tensor, picks: tuple[int, ...], size: int, dim: int = 0) -> torch.Tensor:
    """Blocks of ``size`` rows (or columns, ``dim=1``) of ``rows`` in the order ``picks``; -1 gives a zero block."""
    blocks = []
    for pick in picks:
        if pick < 0:
            shape = list(rows.shape)
            shape[dim] = size
            blocks.append(rows.new_zeros(shape))
        else:
            blocks.append(rows.narrow(dim, pick * size, size))
    return torch.cat(blocks, dim=dim)


def _zero_like_rows(like: torch.Tensor, rows: int) -> torch.Tensor:
    return like.new_zeros((rows, *like.shape[1:]))


def _layer_tensors(
    geo: Geometry, block: nn.Module, plan: GgufLayer, state: dict[str, torch.Tensor], layer: int
) -> dict[str, torch.Tensor]:
    p, hd = f"model.layers.{layer}.", geo.head_dim
    out: dict[str, torch.Tensor] = {}
    blk = f"blk.{layer}."
    sa, mlp = block.self_attn, block.mlp
    if plan.query_heads:
        q = state.get(f"{p}self_attn.q_proj.weight", _zero_like_rows(sa.q_proj.weight, 0))
        k = state.get(f"{p}self_attn.k_proj.weight", _zero_like_rows(sa.k_proj.weight, 0))
        v = state.get(f"{p}self_attn.v_proj.weight", _zero_like_rows(sa.v_proj.weight, 0))
        o = state.get(f"{p}self_attn.o_proj.weight", sa.o_proj.weight.new_zeros((geo.hidden, 0)))
        nq, nkv = len(plan.query_heads), len(plan.kv_heads)
        out[f"{blk}attn_norm.weight"] = state.get(f"{p}input_layernorm.weight", block.input_layernorm.weight)
        out[f"{blk}attn_q.weight"] = _pairwise_rope(_heads(q, plan.query_heads, hd), nq)
        out[f"{blk}attn_k.weight"] = _pairwise_rope(_heads(k, plan.kv_heads, hd), nkv)
        out[f"{blk}attn_v.weight"] = _heads(v, plan.kv_heads, hd)
        out[f"{blk}attn_output.weight"] = _heads(o, plan.query_heads, hd, dim=1)
        if geo.qkv_bias:
            for name, src, picks, heads, rope in (
                ("attn_q", "q_proj", plan.query_heads, nq, True),
                ("attn_k", "k_proj", plan.kv_heads, nkv, True),
                ("attn_v", "v_proj", plan.kv_heads, nkv, False),
            ):
                bias = state.get(f"{p}self_attn.{src}.bias", getattr(sa, src).bias.new_zeros(0))
                bias = _heads(bias, picks, hd)
                out[f"{blk}{name}.bias"] = _pairwise_rope(bias, heads) if rope else bias
    if geo.o_bias:
        out[f"{blk}attn_output.bias"] = sa.o_proj.bias.detach()
    if plan.neurons:
        zero = plan.zero_ffn
        out[f"{blk}ffn_norm.weight"] = block.post_attention_layernorm.weight.detach()
        gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
        out[f"{blk}ffn_gate.weight"] = gate.new_zeros((1, geo.hidden)) if zero else state[f"{p}mlp.gate_proj.weight"]
        out[f"{blk}ffn_up.weight"] = up.new_zeros((1, geo.hidden)) if zero else state[f"{p}mlp.up_proj.weight"]
        down = mlp.down_proj.weight.new_zeros((geo.hidden, 1)) if zero else state[f"{p}mlp.down_proj.weight"]
        out[f"{blk}ffn_down.weight"] = down
        if geo.mlp_bias:
            for name, src in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj")):
                bias = getattr(mlp, src).bias
                out[f"{blk}{name}.bias"] = bias.new_zeros(1) if zero else state[f"{p}mlp.{src}.bias"]
            out[f"{blk}ffn_down.bias"] = mlp.down_proj.bias.detach()
    return out


def _llama3_rope_factors(config: PretrainedConfig, head_dim: int) -> torch.Tensor:
    """Per-frequency divisors of Llama 3's RoPE scaling, which llama.cpp reads as ``rope_freqs.weight``."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(config.rope_parameters)
    base = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    default = 1.0 / (rope["rope_theta"] ** base)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (default / scaled.double()).float()


def _tokenizer_pre(tokenizer_json: dict) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenizer, read from its ``tokenizer.json`` structure."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's own split, as transformers builds it for a tokenizer read from a GGUF
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    patterns = [part.get("pattern", {}).get("Regex", "") for part in parts if part.get("type") == "Split"]
    if patterns and "?i:'s|'t|'re|'ve|'m|'ll|'d" in patterns[0]:
        if "\\p{N}{1,3}" in patterns[0]:
            return "llama-bpe"
        if "|\\p{N}|" in patterns[0]:
            return "qwen2"
    raise ExportError(
        f"the gguf export does not know this tokenizer's pre-tokenizer ({kinds}); it writes the byte-level BPE "
        "tokenizers of GPT-2, SmolLM, Llama 3 and Qwen2. Use the compact export"
    )


def _add_tokenizer(writer: object, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        if not path.exists():
            raise ExportError("the gguf export needs a fast tokenizer (tokenizer.json); use the compact export")
        spec = json.loads(path.read_text())
        if spec.get("model", {}).get("type") != "BPE":
            raise ExportError("the gguf export writes byte-level BPE tokenizers only; use the compact export")
        by_id = {i: t for t, i in tokenizer.get_vocab().items()}
        added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
        tokens, types = [], []
        for i in range(vocab_size):
            token = by_id.get(i)
            if token is None:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
                continue
            tokens.append(token)
            if token in added:
                types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_tokenizer_pre(spec))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _encode(tensor: torch.Tensor, kind: GgufType) -> tuple[np.ndarray, Any]:
    """The array to write and its GGML type (None: the array's own). Norms and other 1-D tensors stay f32, as
    llama.cpp's converter writes them; with ``q8_0`` a matrix whose rows do not split into 32-value blocks (a
    searched FFN width in ``ffn_down``) stays f16."""
    import gguf

    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if data.ndim == 1 or kind == "f32":
        return data, None
    if kind == "q8_0" and data.shape[-1] % Q8_0_BLOCK == 0:
        q8_0 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data, q8_0), q8_0
    return data.astype(np.float16), None


FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


def gguf_tensors(model: nn.Module, layout: PrunedLayout) -> tuple[list[GgufLayer], dict[str, torch.Tensor]]:
    """The per-layer plan and every tensor of the GGUF, under llama.cpp's names, in the model's dtype."""
    config = model.config
    geo = geometry(config)
    _check_model(config, geo)
    plans = gguf_layers(geo, layout)
    state = compact_state_dict(model, layout)
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if not getattr(config, "tie_word_embeddings", False):
        tensors["output.weight"] = state["lm_head.weight"]
    if dict(config.rope_parameters).get("rope_type", "default") == "llama3":
        tensors["rope_freqs.weight"] = _llama3_rope_factors(config, geo.head_dim)
    for layer, (block, plan) in enumerate(zip(model.model.layers, plans, strict=True)):
        tensors |= _layer_tensors(geo, block, plan, state, layer)
    return plans, tensors


def save_gguf(
    model: nn.Module,
    layout: PrunedLayout,
    out_dir: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    gguf_type: GgufType = "f16",
    name: str | None = None,
) -> Path:
    """Write ``out_dir/model.gguf``: llama.cpp's ``deci`` architecture with per-layer heads and widths.

    The file computes the same function as the compact export (exactly, up to the written precision); see the module
    docstring for the zero heads and neurons some layouts need. The write is atomic (see ``atomic_write``).

    Args:
        model: the dense model (Llama, Mistral or Qwen2).
        layout: the kept groups and refitted output projections of every sublayer.
        out_dir: the folder to create or replace.
        tokenizer: required: a GGUF carries its tokenizer.
        gguf_type: ``f16`` (2-D weights in half precision, norms f32), ``q8_0`` (2-D weights in 8-bit blocks where
            their rows split into blocks of 32, else f16) or ``f32``; llama.cpp's ``llama-quantize`` makes others.
        name: ``general.name`` of the file.

    Returns:
        ``out_dir``.

    Raises:
        ExportError: the model, its tokenizer or its RoPE is one the GGUF writer cannot express, or the layout does
            not fit the model.
    """
    import gguf

    if tokenizer is None:
        raise ExportError("the gguf export needs the model's tokenizer: a GGUF file carries it")
    if gguf_type not in FILE_TYPES:
        raise ExportError(f"export.gguf_type must be one of {sorted(FILE_TYPES)}, got {gguf_type!r}")
    config = model.config
    geo = geometry(config)
    plans, tensors = gguf_tensors(model, layout)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp / FILE_NAME), ARCH)
        writer.add_name(name or getattr(config, "_name_or_path", "") or "tyr-pruned")
        writer.add_file_type(FILE_TYPES[gguf_type])
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(geo.hidden)
        writer.add_block_count(geo.num_layers)
        writer.add_vocab_size(config.vocab_size)
        writer.add_feed_forward_length([p.neurons for p in plans])
        writer.add_head_count([len(p.query_heads) for p in plans])
        writer.add_head_count_kv([len(p.kv_heads) for p in plans])
        writer.add_key_length(geo.head_dim)
        writer.add_value_length(geo.head_dim)
        writer.add_rope_dimension_count(geo.head_dim)
        writer.add_rope_freq_base(float(dict(config.rope_parameters)["rope_theta"]))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        for tensor_name, tensor in tensors.items():
            data, raw_dtype = _encode(tensor, gguf_type)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(Path(out_dir), write)


def gguf_params(plans: list[GgufLayer], geo: Geometry) -> int:
    """Decoder weights the GGUF holds (zero heads and neurons included), for the model card's accounting."""
    per_head = geo.hidden * geo.head_dim
    total = 0
    for plan in plans:
        total += per_head * (2 * len(plan.query_heads) + 2 * len(plan.kv_heads)) + 3 * geo.hidden * plan.neurons
    return total


def padding_cost(plans: list[GgufLayer], geo: Geometry) -> float:
    """Fraction of the written decoder weights that are zero padding (0 when every layout is expressed as is)."""
    per_head = geo.hidden * geo.head_dim
    pad = sum(
        per_head * 2 * sum(1 for q in p.query_heads if q < 0)
        + per_head * 2 * sum(1 for k in p.kv_heads if k < 0)
        + (3 * geo.hidden if p.zero_ffn else 0)
        for p in plans
    )
    total = gguf_params(plans, geo)
    return pad / total if total else 0.0
