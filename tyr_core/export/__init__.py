"""Exports of a pruned layout: compact (per-layer shapes), masked dense, vLLM Nemotron-NAS, llama.cpp GGUF, the model
card and the sparsity report.

Importing this package registers ``tyr_llama`` with transformers' Auto classes, so a compact export loads with
``AutoModelForCausalLM.from_pretrained(dir)`` where tyr is imported (``trust_remote_code=True`` elsewhere).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .compact import atomic_write, build_compact_model, check_layout, compact_config, compact_state_dict, save_compact
from .configuration_tyr import TyrConfig
from .gguf import gguf_layers, gguf_tensors, save_gguf
from .masked import masked_model, save_masked
from .model_card import FORMATS, CardFacts, model_card, write_model_card
from .modeling_tyr import TyrForCausalLM
from .nemotron import ffn_mult_width, nemotron_config, save_nemotron, validate_nemotron
from .plot import sparsity_distribution, write_sparsity_report

AutoConfig.register(TyrConfig.model_type, TyrConfig, exist_ok=True)
AutoModelForCausalLM.register(TyrConfig, TyrForCausalLM, exist_ok=True)

__all__ = [
    "FORMATS",
    "CardFacts",
    "gguf_layers",
    "gguf_tensors",
    "model_card",
    "save_gguf",
    "write_model_card",
    "TyrConfig",
    "TyrForCausalLM",
    "atomic_write",
    "build_compact_model",
    "check_layout",
    "compact_config",
    "compact_state_dict",
    "ffn_mult_width",
    "masked_model",
    "nemotron_config",
    "save_compact",
    "save_masked",
    "save_nemotron",
    "sparsity_distribution",
    "validate_nemotron",
    "write_sparsity_report",
]
