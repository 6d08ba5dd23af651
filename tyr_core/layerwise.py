"""Layer-at-a-time execution: one decoder block resident, weights read lazily from safetensors, activations
kept in memory or spilled to a file when they exceed a budget. Peak memory does not grow with depth.
"""

from __future__ import annotations

import copy
import json
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
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

    def block(self, index: int, device: torch.device | str | None = None) -> nn.Module:
        prefix = f"model.layers.{index}."
        state = self.weights.load(prefix, self.dtype)
        return _materialise(self.skeleton.model.layers[index], state, prefix[:-1], device or self.device)

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


class ShardedActivations:
    """``N`` sequences of hidden states cut into chunks of ``chunk`` windows, chunk ``c`` held by device
    ``c mod len(devices)`` (each device's chunks in order, in one ``Activations`` of its own).

    Chunks are dealt out in turn rather than in contiguous runs so that, while every device works through its own
    chunks, the partial results arrive in chunk order one from each device: an ordered sum holds one partial per
    device at a time. The chunks are the same for any number of devices, so each one's results are too.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        dtype: torch.dtype,
        chunk: int,
        devices: Sequence[torch.device | str] = ("cpu",),
        budget_bytes: int = 1 << 62,
        spill_dir: Path | None = None,
        device_budget: int = 0,
        parts: list[Activations] | None = None,
    ):
        self.shape, self.chunk = shape, chunk
        self.devices = [torch.device(d) for d in devices]
        self.count = -(-shape[0] // chunk)  # chunks: all of ``chunk`` windows but the last
        g = len(self.devices)
        self.owned = [list(range(k, self.count, g)) for k in range(g)]
        if parts is None:
            # host memory is shared by the parts; each device has its own device memory
            parts = [
                Activations((self._rows(k), *shape[1:]), dtype, budget_bytes // g, spill_dir, d, device_budget)
                for k, d in enumerate(self.devices)
            ]
        self.parts = parts

    @classmethod
    def of(cls, acts: Activations, chunk: int, device: torch.device | str = "cpu") -> ShardedActivations:
        """One device's ``Activations`` seen as chunks (no copy)."""
        return cls(acts.shape, acts.data.dtype, chunk, [device], parts=[acts])

    def _rows(self, k: int) -> int:
        return sum(self.span(c)[1] - self.span(c)[0] for c in self.owned[k])

    def span(self, c: int) -> tuple[int, int]:
        """Rows ``[start, end)`` of chunk ``c`` among the ``N`` sequences."""
        return c * self.chunk, min((c + 1) * self.chunk, self.shape[0])

    def owner(self, c: int) -> int:
        return c % len(self.devices)

    def local(self, c: int) -> torch.Tensor:
        """Chunk ``c`` in its device's storage (a view: writing into it writes the chunk)."""
        start, end = self.span(c)
        offset = (c // len(self.devices)) * self.chunk  # every earlier chunk of a device is a whole one
        return self.parts[self.owner(c)].data[offset : offset + end - start]

    @property
    def spilled(self) -> bool:
        return any(p.spilled for p in self.parts)

    @property
    def data(self) -> torch.Tensor:
        """All ``N`` sequences in order: the one part itself, or a gathered copy in host memory."""
        if len(self.parts) == 1:
            return self.parts[0].data
        out = torch.empty(self.shape, dtype=self.parts[0].data.dtype)
        for c in range(self.count):
            start, end = self.span(c)
            out[start:end] = self.local(c).to("cpu")
        return out

    def copy_from(self, other: ShardedActivations) -> None:
        for mine, theirs in zip(self.parts, other.parts, strict=True):
            mine.data.copy_(theirs.data)


_STOP = object()


def in_chunk_order(
    sharded: ShardedActivations, work: Callable[[int], Iterator[tuple[int, object]]]
) -> Iterator[tuple[int, object]]:
    """``work(k)`` yields ``(chunk, result)`` over device ``k``'s chunks; the results of all devices, in chunk order.

    One device runs in the caller's thread; several run one thread each, each a step ahead of the caller at most,
    so a device holds no more than two results however many chunks it owns.
    """
    if len(sharded.devices) == 1:
        yield from work(0)
        return
    queues = [queue.Queue(maxsize=1) for _ in sharded.devices]
    stop = threading.Event()

    def put(k: int, item: tuple) -> bool:
        while not stop.is_set():
            try:
                queues[k].put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(k: int) -> None:
        try:
            for item in work(k):
                if not put(k, item):
                    return
            put(k, (_STOP, None))
        except BaseException as err:  # handed to the caller, which raises it
            put(k, (_STOP, err))

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(len(sharded.devices))]
    for t in threads:
        t.start()
    try:
        for c in range(sharded.count):
            got, result = queues[sharded.owner(c)].get()
            if got is _STOP:
                raise result if result is not None else RuntimeError(f"device {sharded.owner(c)} skipped chunk {c}")
            yield got, result
    finally:
        stop.set()
        for t in threads:
            t.join()


def on_each_device(count: int, work: Callable[[int], None]) -> None:
    """``work(k)`` for every device index ``k``: in the caller's thread for one device, else one thread each."""
    if count == 1:
        work(0)
        return
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            work(k)
        except BaseException as err:  # raised in the caller below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


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
def capture_inputs(modules: dict[str, nn.Linear], on_input: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Forward pre-hooks passing each module's input ``(B, T, d_in)`` to ``on_input(name, x)``."""
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: on_input(name, args[0])) for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def embed_windows(
    model: LayerwiseModel, windows: torch.Tensor, act: Activations | ShardedActivations, batch_size: int
) -> None:
    """Block 0's inputs for every calibration window (on the model's device, a chunk at a time, then to the chunk's
    device: the same values for any number of devices)."""
    emb = model.embeddings()
    sharded = act if isinstance(act, ShardedActivations) else ShardedActivations.of(act, batch_size)
    if sharded.chunk != batch_size:
        raise ValueError(f"activations are chunked by {sharded.chunk} windows, not batch_size={batch_size}")
    with torch.inference_mode():
        for c in range(sharded.count):
            start, end = sharded.span(c)
            sharded.local(c)[:] = emb(windows[start:end].to(model.device))
