"""Physically smaller export: a ``TyrForCausalLM`` with per-layer shapes, built from the dense model and a layout."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..families import geometry
from ..pruned import PrunedLayout, kept_columns
from .configuration_tyr import TyrConfig
from .modeling_tyr import TyrForCausalLM

_HERE = Path(__file__).parent


def compact_config(config, layout: PrunedLayout) -> TyrConfig:
    geo = geometry(config)
    heads, kv_heads, kv_map, widths = [], [], [], []
    for layer in range(geo.num_layers):
        kept = layout[(layer, "attn")].kept.long()
        kv = sorted(set((kept // geo.heads_per_kv).tolist()))
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
        rope_parameters=dict(config.rope_parameters),
        qkv_bias=geo.qkv_bias,
        o_bias=geo.o_bias,
        mlp_bias=geo.mlp_bias,
        qk_norm=geo.family == "qwen3",
        source_model_type=geo.family,
        layer_heads=heads,
        layer_kv_heads=kv_heads,
        layer_kv_map=kv_map,
        layer_intermediate=widths,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def _rows(lin: nn.Linear, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"weight": lin.weight.detach()[rows]}
    if lin.bias is not None:
        out["bias"] = lin.bias.detach()[rows]
    return out


def compact_state_dict(model: nn.Module, layout: PrunedLayout) -> dict[str, torch.Tensor]:
    """Weights of the compact model: kept rows of q/k/v and gate/up, refitted o/down on the kept columns."""
    geo = geometry(model.config)
    sd: dict[str, torch.Tensor] = {}
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        sd[name] = model.get_parameter(name).detach()
    for layer, block in enumerate(model.model.layers):
        p = f"model.layers.{layer}."
        attn, mlp = layout[(layer, "attn")], layout[(layer, "mlp")]
        if not attn.removed_all:
            kept = attn.kept.long()
            q_rows = kept_columns(kept, geo.head_dim)
            kv = torch.tensor(sorted(set((kept // geo.heads_per_kv).tolist())), dtype=torch.long)
            kv_rows = kept_columns(kv, geo.head_dim)
            sa = block.self_attn
            for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                sd.update({f"{p}self_attn.{proj}.{k}": v for k, v in _rows(getattr(sa, proj), rows).items()})
            sd[f"{p}self_attn.o_proj.weight"] = attn.weight
            if sa.o_proj.bias is not None:
                sd[f"{p}self_attn.o_proj.bias"] = sa.o_proj.bias.detach()
            if geo.family == "qwen3":
                sd[f"{p}self_attn.q_norm.weight"] = sa.q_norm.weight.detach()
                sd[f"{p}self_attn.k_norm.weight"] = sa.k_norm.weight.detach()
            sd[f"{p}input_layernorm.weight"] = block.input_layernorm.weight.detach()
        if not mlp.removed_all:
            rows = mlp.kept.long()
            for proj in ("gate_proj", "up_proj"):
                sd.update({f"{p}mlp.{proj}.{k}": v for k, v in _rows(getattr(block.mlp, proj), rows).items()})
            sd[f"{p}mlp.down_proj.weight"] = mlp.weight
            if block.mlp.down_proj.bias is not None:
                sd[f"{p}mlp.down_proj.bias"] = block.mlp.down_proj.bias.detach()
            sd[f"{p}post_attention_layernorm.weight"] = block.post_attention_layernorm.weight.detach()
    return {k: v.contiguous().clone() for k, v in sd.items()}


def build_compact_model(model: nn.Module, layout: PrunedLayout) -> TyrForCausalLM:
    config = compact_config(model.config, layout)
    dtype = next(model.parameters()).dtype
    compact = TyrForCausalLM(config).to(dtype).eval()
    missing, unexpected = compact.load_state_dict(compact_state_dict(model, layout), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    if config.tie_word_embeddings:
        compact.tie_weights()
    return compact


def save_compact(model: nn.Module, layout: PrunedLayout, out_dir: Path, tokenizer=None) -> Path:
    """Write the compact model (safetensors, config with ``auto_map``, our modeling files) atomically."""
    compact = build_compact_model(model, layout)
    compact.config.auto_map = {
        "AutoConfig": "configuration_tyr.TyrConfig",
        "AutoModelForCausalLM": "modeling_tyr.TyrForCausalLM",
    }
    return _atomic_save(Path(out_dir), lambda tmp: _write_compact(compact, tmp, tokenizer))


def _write_compact(compact: TyrForCausalLM, tmp: Path, tokenizer) -> None:
    compact.save_pretrained(tmp, safe_serialization=True)
    for name in ("configuration_tyr.py", "modeling_tyr.py"):
        shutil.copy(_HERE / name, tmp / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def _atomic_save(out: Path, write) -> Path:
    """Write into a temp folder beside ``out`` and rename it into place: never a half-written export."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
