"""Layer-at-a-time execution: one decoder block resident, weights read lazily from safetensors, activations
kept in memory or spilled to a file when they exceed a budget. Peak memory does not grow with depth.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from .errors import ModelNotFoundError
from .families import Geometry, geometry, load_config


class WeightIndex:
    """Which safetensors file holds each tensor of a HF folder; tensors are read one at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.files = {}
            for file in sorted(self.folder.glob("*.safetensors")):
                with safe_open(file, "pt") as f:
                    self.files.update({k: file for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
        if not self.files:
            raise ModelNotFoundError(f"no safetensors weights in {self.folder}")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def load(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """All tensors whose name starts with ``prefix``, with the prefix stripped."""
        by_file: dict[Path, list[str]] = {}
        for name, file in self.files.items():
            if name.startswith(prefix):
                by_file.setdefault(file, []).append(name)
        out = {}
        for file, names in by_file.items():
            with safe_open(file, "pt") as f:
                out.update({n[len(prefix) :]: f.get_tensor(n).to(dtype) for n in names})
        return out


def _materialise(
    module: nn.Module, state: dict[str, torch.Tensor], where: str, device: torch.device | str = "cpu"
) -> nn.Module:
    module = copy.deepcopy(module).to_empty(device=device)
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise ModelNotFoundError(
            f"weights of {where} do not match the config: missing {missing}, unexpected {unexpected}"
        )
    return module


class LayerwiseModel:
    """A causal LM whose parts are materialised on demand from a folder of safetensors.

    The skeleton is built on the meta device (no memory); ``block(i)`` returns decoder layer ``i`` with its dense
    weights in ``dtype`` on ``device``. Used for statistics collection and supernet construction.
    """

    def __init__(
        self,
        folder: Path,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        device: torch.device | str = "cpu",
    ):
        self.folder = Path(folder)
        self.device = torch.device(device)
        self.config: PretrainedConfig = load_config(self.folder, trust_remote_code)
        self.config._attn_implementation = "sdpa"  # causal masking without materialising masks
        self.geometry: Geometry = geometry(self.config)
        self.dtype = dtype
        self.weights = WeightIndex(self.folder)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.rotary = type(self.skeleton.model.rotary_emb)(config=self.config)

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    def embeddings(self) -> nn.Module:
        state = self.weights.load("model.embed_tokens.", self.dtype)
        return _materialise(self.skeleton.model.embed_tokens, state, "model.embed_tokens", self.device)

    def block(self, index: int) -> nn.Module:
        prefix = f"model.layers.{index}."
        state = self.weights.load(prefix, self.dtype)
        return _materialise(self.skeleton.model.layers[index], state, prefix[:-1], self.device)

    def final_norm(self) -> nn.Module:
        state = self.weights.load("model.norm.", self.dtype)
        return _materialise(self.skeleton.model.norm, state, "model.norm", self.device)

    def lm_head(self) -> nn.Module:
        name = "lm_head." if "lm_head.weight" in self.weights else "model.embed_tokens."
        return _materialise(self.skeleton.lm_head, self.weights.load(name, self.dtype), "lm_head", self.device)

    def position_embeddings(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = self.rotary.to(self.device)
        ids = torch.arange(seq_len, device=self.device)[None]
        return rotary(torch.zeros(1, seq_len, 1, dtype=self.dtype, device=self.device), ids)


def activation_bytes(shape: tuple[int, int, int], dtype: torch.dtype) -> int:
    return shape[0] * shape[1] * shape[2] * torch.finfo(dtype).bits // 8


class Activations:
    """``N`` sequences of hidden states ``(N, T, hidden)``: on the compute device when they fit ``device_budget``,
    else in host memory (pinned, when the device is a GPU) up to ``budget_bytes``, else in a file."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        dtype: torch.dtype,
        budget_bytes: int,
        spill_dir: Path | None,
        device: torch.device | str = "cpu",
        device_budget: int = 0,
    ):
        self.shape = shape
        device = torch.device(device)
        nbytes = activation_bytes(shape, dtype)
        on_device = device.type != "cpu" and nbytes <= device_budget
        self.placement = "device" if on_device else "host" if nbytes <= budget_bytes else "disk"
        self.spilled = self.placement == "disk"
        if self.spilled:
            handle = tempfile.NamedTemporaryFile(dir=spill_dir, prefix="tyr-act-", suffix=".bin", delete=True)
            handle.truncate(nbytes)
            self._file = handle  # deleted when this object is collected
            self.data = torch.from_file(handle.name, shared=True, size=shape[0] * shape[1] * shape[2], dtype=dtype)
            self.data = self.data.view(shape)
        elif on_device:
            self.data = torch.empty(shape, dtype=dtype, device=device)
        else:
            self.data = torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")

    def batches(self, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, self.shape[0], batch_size):
            yield start, self.data[start : start + batch_size]


def run_block(
    block: nn.Module,
    inputs: Activations,
    outputs: Activations | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
) -> None:
    """Run ``block`` over every stored sequence; write into ``outputs`` when given (hooks may just observe)."""
    device = position_embeddings[0].device
    with torch.inference_mode():
        for start, x in inputs.batches(batch_size):
            y = block(x.to(device, non_blocking=True), attention_mask=None, position_embeddings=position_embeddings)
            y = y[0] if isinstance(y, tuple) else y
            if outputs is not None:
                outputs.data[start : start + x.shape[0]] = y


@contextmanager
def capture_inputs(modules: dict[str, nn.Linear], on_input: Callable[[str, torch.Tensor], None]):
    """Forward pre-hooks passing each module's input ``(B, T, d_in)`` to ``on_input(name, x)``."""
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: on_input(name, args[0])) for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def embed_windows(model: LayerwiseModel, windows: torch.Tensor, act: Activations, batch_size: int) -> None:
    """Block 0's inputs for every calibration window."""
    emb = model.embeddings()
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            act.data[start : start + batch_size] = emb(windows[start : start + batch_size].to(model.device))
