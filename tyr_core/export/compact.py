"""Physically smaller export: a ``TyrForCausalLM`` with per-layer shapes, built from the dense model and a layout.

For a kept head we keep its q rows, the k/v rows of the KV head it reads, and the refitted o_proj columns; for a
kept neuron its gate/up rows and the refitted down_proj column (docs/algorithm.md). GQA heads pruned unevenly
across KV groups are handled by a per-layer query-head -> KV-head map instead of padding.
A sublayer with no groups left is dropped.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ExportError
from ..families import Geometry, geometry
from ..sublayer_layout import PrunedLayout, PrunedSublayer, kept_columns
from .configuration_tyr import TyrConfig
from .modeling_tyr import TyrForCausalLM, TyrRotaryEmbedding

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

_HERE = Path(__file__).parent
MODELING_FILES = ("configuration_tyr.py", "modeling_tyr.py")
AUTO_MAP = {"AutoConfig": "configuration_tyr.TyrConfig", "AutoModelForCausalLM": "modeling_tyr.TyrForCausalLM"}


def check_layout(geo: Geometry, layout: PrunedLayout) -> None:
    """Check that ``layout`` describes every sublayer of a model with geometry ``geo``.

    Raises:
        ExportError: naming the first ``(layer, kind)`` that is missing, has unsorted, repeated or out-of-range
            kept indices, or whose refitted weight has the wrong shape.
    """
    for layer in range(geo.num_layers):
        for kind in ("attn", "mlp"):
            if (layer, kind) not in layout:
                raise ExportError(f"layout has no entry for layer {layer} {kind}: a layout must cover every sublayer")
            sub = layout[(layer, kind)]
            kept, groups = sub.kept.long(), geo.groups(kind)
            if kept.dim() != 1 or (kept.numel() and (kept.min() < 0 or kept.max() >= groups)):
                raise ExportError(f"layer {layer} {kind}: kept indices must be a 1-D tensor in [0, {groups})")
            if kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all()):
                raise ExportError(f"layer {layer} {kind}: kept indices must be sorted and unique")
            expected = (geo.hidden, kept.numel() * geo.group_size(kind))
            if tuple(sub.weight.shape) != expected:
                raise ExportError(
                    f"layer {layer} {kind}: refitted weight has shape {tuple(sub.weight.shape)}, expected {expected}"
                )


def kept_kv_heads(geo: Geometry, kept_heads: torch.Tensor) -> torch.Tensor:
    """Sorted KV heads read by at least one kept query head (query head h reads KV head h // heads_per_kv)."""
    return torch.unique(kept_heads.long() // geo.heads_per_kv)


def _layer_windows(config: PretrainedConfig) -> list[int | None]:
    """Per-layer sliding window of the source model, as transformers applies it (None: full causal)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None:
        return [None] * config.num_hidden_layers
    if layer_types is None:  # Mistral: one window for every layer
        return [window] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def compact_config(config: PretrainedConfig, layout: PrunedLayout) -> TyrConfig:
    """The ``TyrConfig`` of the compact model: the dense config plus the layout's per-layer shapes.

    Args:
        config: the dense model's config (Llama, Mistral, Qwen2 or Qwen3).
        layout: the kept groups of every sublayer.

    Returns:
        A config whose ``layer_*`` lists give, per layer, kept query heads, kept KV heads, the query-head ->
        kept-KV-head map, kept neurons and the sliding window.

    Raises:
        UnsupportedModelError: the config is not a supported family.
        ExportError: the layout does not fit the model.
    """
    geo = geometry(config)
    check_layout(geo, layout)
    heads, kv_heads, kv_map, widths = [], [], [], []
    for layer in range(geo.num_layers):
        kept = layout[(layer, "attn")].kept.long()
        kv = kept_kv_heads(geo, kept).tolist()
        heads.append(int(kept.numel()))
        kv_heads.append(len(kv))
        kv_map.append([kv.index(int(h) // geo.heads_per_kv) for h in kept])
        widths.append(int(layout[(layer, "mlp")].kept.numel()))
    return TyrConfig(
        vocab_size=config.vocab_size,
        hidden_size=geo.hidden,
        num_hidden_layers=geo.num_layers,
        num_attention_heads=geo.heads,
        num_key_value_heads=geo.kv_heads,
        head_dim=geo.head_dim,
        intermediate_size=geo.intermediate,
        hidden_act=config.hidden_act,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=getattr(config, "initializer_range", 0.02),
        rope_parameters=copy.deepcopy(dict(config.rope_parameters)),
        qkv_bias=geo.qkv_bias,
        o_bias=geo.o_bias,
        mlp_bias=geo.mlp_bias,
        qk_norm=geo.family == "qwen3",
        source_model_type=geo.family,
        layer_heads=heads,
        layer_kv_heads=kv_heads,
        layer_kv_map=kv_map,
        layer_intermediate=widths,
        layer_sliding_window=_layer_windows(config),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        dtype=getattr(config, "dtype", None),
    )


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy that shares no memory with the dense model (the compact model must not alias it)."""
    return tensor.detach().clone()


def _rows(prefix: str, lin: nn.Linear, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """``lin``'s weight (and bias) restricted to ``rows``; indexing already copies."""
    out = {f"{prefix}.weight": lin.weight.detach()[rows.to(lin.weight.device)]}
    if lin.bias is not None:
        out[f"{prefix}.bias"] = lin.bias.detach()[rows.to(lin.bias.device)]
    return out


def _refitted(sub_weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The layout's refitted weight, copied into the dense model's dtype and device (layouts are often fp32)."""
    return sub_weight.detach().to(device=like.device, dtype=like.dtype, copy=True)


def _attention_state(geo: Geometry, block: nn.Module, sub: PrunedSublayer, p: str) -> dict[str, torch.Tensor]:
    sa = block.self_attn
    if sub.removed_all:  # only o_proj's bias survives a dropped attention (residual + constant)
        return {f"{p}attn_output_bias": _copy(sa.o_proj.bias)} if sa.o_proj.bias is not None else {}
    kept = sub.kept.long()
    q_rows = kept_columns(kept, geo.head_dim)
    kv_rows = kept_columns(kept_kv_heads(geo, kept), geo.head_dim)
    out = {f"{p}input_layernorm.weight": _copy(block.input_layernorm.weight)}
    out |= _rows(f"{p}self_attn.q_proj", sa.q_proj, q_rows)
    out |= _rows(f"{p}self_attn.k_proj", sa.k_proj, kv_rows)
    out |= _rows(f"{p}self_attn.v_proj", sa.v_proj, kv_rows)
    out[f"{p}self_attn.o_proj.weight"] = _refitted(sub.weight, sa.o_proj.weight)
    if sa.o_proj.bias is not None:
        out[f"{p}self_attn.o_proj.bias"] = _copy(sa.o_proj.bias)
    if geo.family == "qwen3":  # per-head norms over head_dim: shared by every head, kept whole
        out[f"{p}self_attn.q_norm.weight"] = _copy(sa.q_norm.weight)
        out[f"{p}self_attn.k_norm.weight"] = _copy(sa.k_norm.weight)
    return out


def _mlp_state(block: nn.Module, sub: PrunedSublayer, p: str) -> dict[str, torch.Tensor]:
    mlp = block.mlp
    if sub.removed_all:
        return {f"{p}mlp_output_bias": _copy(mlp.down_proj.bias)} if mlp.down_proj.bias is not None else {}
    rows = sub.kept.long()
    out = {f"{p}post_attention_layernorm.weight": _copy(block.post_attention_layernorm.weight)}
    out |= _rows(f"{p}mlp.gate_proj", mlp.gate_proj, rows)
    out |= _rows(f"{p}mlp.up_proj", mlp.up_proj, rows)
    out[f"{p}mlp.down_proj.weight"] = _refitted(sub.weight, mlp.down_proj.weight)
    if mlp.down_proj.bias is not None:
        out[f"{p}mlp.down_proj.bias"] = _copy(mlp.down_proj.bias)
    return out


def compact_state_dict(model: nn.Module, layout: PrunedLayout) -> dict[str, torch.Tensor]:
    """Weights of the compact model under Llama's standard names.

    Kept rows of q/k/v and gate/up (dense values), the refitted o_proj/down_proj on the kept columns, the norms of
    kept sublayers, embeddings, final norm and ``lm_head`` (when tied, the same tensor as the embeddings). No tensor
    shares memory with ``model`` or ``layout``.

    Args:
        model: the dense ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``.
        layout: the kept groups and refitted output projections of every sublayer.

    Returns:
        Name -> tensor, in the dense model's dtype and on its device.

    Raises:
        UnsupportedModelError: the model is not a supported family.
        ExportError: the layout does not fit the model.
    """
    geo = geometry(model.config)
    check_layout(geo, layout)
    embeddings = _copy(model.model.embed_tokens.weight)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {
        "model.embed_tokens.weight": embeddings,
        "model.norm.weight": _copy(model.model.norm.weight),
        "lm_head.weight": embeddings if tied else _copy(model.lm_head.weight),
    }
    for layer, block in enumerate(model.model.layers):
        prefix = f"model.layers.{layer}."
        state |= _attention_state(geo, block, layout[(layer, "attn")], prefix)
        state |= _mlp_state(block, layout[(layer, "mlp")], prefix)
    return state


def build_compact_model(model: nn.Module, layout: PrunedLayout) -> TyrForCausalLM:
    """The compact model in memory: same function as ``masked_model(model, layout)``, fewer parameters.

    Args:
        model: the dense model (Llama, Mistral, Qwen2 or Qwen3 causal LM).
        layout: the kept groups and refitted output projections of every sublayer.

    Returns:
        A ``TyrForCausalLM`` in eval mode, in the dense model's dtype and on its device.

    Raises:
        UnsupportedModelError: the model is not a supported family.
        ExportError: the layout does not fit the model.
    """
    config = compact_config(model.config, layout)
    config._attn_implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    state = compact_state_dict(model, layout)
    device, config.dtype = state["model.embed_tokens.weight"].device, state["model.embed_tokens.weight"].dtype
    with torch.device("meta"):  # skeleton only: random init of a large model would cost minutes and memory
        compact = TyrForCausalLM(config)
    compact.load_state_dict(state, strict=True, assign=True)
    # non-persistent RoPE buffers are not in the state dict; build them for real
    compact.model.rotary_emb = TyrRotaryEmbedding(config, device=device)
    if config.tie_word_embeddings:
        compact.lm_head.weight = compact.model.embed_tokens.weight
    if getattr(model, "generation_config", None) is not None:  # keep the source's decoding defaults (eos, sampling)
        compact.generation_config = copy.deepcopy(model.generation_config)
    return compact.eval()


def save_compact(
    model: nn.Module, layout: PrunedLayout, out_dir: Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Write the compact model: safetensors weights, config with ``auto_map``, and our config/modeling files.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)`` anywhere
    transformers is installed, and without the flag where ``tyr_core.export`` has been imported. The write is
    atomic: a temporary folder next to ``out_dir`` is renamed into place, so an interrupted export leaves no
    ``out_dir`` (an existing one is replaced only once the new one is complete).

    Args:
        model: the dense model.
        layout: the kept groups and refitted output projections of every sublayer.
        out_dir: the folder to create or replace.
        tokenizer: saved alongside when given.

    Returns:
        ``out_dir``.

    Raises:
        UnsupportedModelError: the model is not a supported family.
        ExportError: the layout does not fit the model.
    """
    compact = build_compact_model(model, layout)
    compact.config.auto_map = dict(AUTO_MAP)
    return atomic_write(Path(out_dir), lambda tmp: _write_compact(compact, tmp, tokenizer))


def write_modeling_files(folder: Path) -> list[str]:
    """Copy the installed package's ``configuration_tyr.py`` and ``modeling_tyr.py`` into ``folder``: the code a
    compact export runs always comes from the installed tyr, never from a store others can write."""
    for name in MODELING_FILES:
        shutil.copy(_HERE / name, Path(folder) / name)
    return list(MODELING_FILES)


def _write_compact(compact: TyrForCausalLM, tmp: Path, tokenizer: PreTrainedTokenizerBase | None) -> None:
    compact.save_pretrained(tmp, safe_serialization=True)
    write_modeling_files(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def atomic_write(out: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh folder beside ``out``, then rename it to ``out``.

    A crash inside ``write`` leaves neither ``out`` nor the temporary folder. An existing ``out`` is moved aside
    and deleted only after the new folder is in place (restored if the rename fails).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    old = out.parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
    try:
        write(tmp)
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out
