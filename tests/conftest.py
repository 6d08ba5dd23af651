"""Shared fixtures: tiny random models of every supported family, saved as HF folders (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    return cls(**{**_COMMON, **overrides})


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32).eval()
    if family == "qwen2":  # random init leaves biases at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if family == "qwen3":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> callable:
    """``tiny_folder(family)`` -> a saved HF folder of a seeded tiny random model of that family."""
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            tiny_model(family).save_pretrained(out, safe_serialization=True)
            cache[family] = out
        return cache[family]

    return make


@pytest.fixture
def windows() -> torch.Tensor:
    """Structured pseudo-text: a random walk over the vocabulary gives correlated activations."""
    g = torch.Generator().manual_seed(1)
    steps = torch.randint(-3, 4, (24, 32), generator=g)
    return (steps.cumsum(dim=1) + torch.randint(0, 128, (24, 1), generator=g)) % 128
