"""What one worker process holds for a run: the store, a local cache of fetched artefacts, the model, and the
layer cursor of the supernet being built. Nothing here is an artefact; all of it can be rebuilt from the store.

A 70B layer's Hessians are gigabytes: they stay here, in the process that computed them, and the local-prune
tasks of that layer run in this process.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict

from tyr_core import keys
from tyr_core.config import RunConfig, load_run_config
from tyr_core.families import default_cache_dir, resolve_model
from tyr_core.fitness import Captured, LogitsFn
from tyr_core.grid import Sublayer
from tyr_core.keys import Kind
from tyr_core.layerwise import LayerwiseModel
from tyr_core.pipeline import (
    Placement,
    check_fits,
    placement,
    prune_settings,
    resident_or_streamed,
    teacher_forward,
)
from tyr_core.prefix import PrefixForward
from tyr_core.store import Store, fetch_verified, hash_file, private_dir, read_json, read_manifest
from tyr_core.sublayer_layout import PrunedSublayer
from tyr_core.supernet import SupernetModel, SupernetReader, load_copy, stored_tensors
from tyr_core.supernet_build import LayerCursor
from tyr_core.tensor_files import load_tensors

from .storage import run_store

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class RunRef(BaseModel):
    """How tasks find a run: small, hashable, and free of credentials (those come from the environment)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    run_id: str
    store_url: str
    endpoint_url: str | None = None


@dataclass
class Workspace:
    ref: RunRef
    store: Store
    config: RunConfig
    cache: Path
    incarnation: str = ""  # run.json's id of this incarnation of the run ("" for runs created before it existed)
    lock: threading.RLock = field(default_factory=threading.RLock)
    _model: LayerwiseModel | None = None
    _cursors: dict[int, LayerCursor] = field(default_factory=dict)
    _search: dict[int, tuple[SupernetModel, PrefixForward]] = field(default_factory=dict)
    _tokenizer: PreTrainedTokenizerBase | None = None
    _plans: dict[int, dict] = field(default_factory=dict)
    _fresh: dict[str, PrunedSublayer] = field(default_factory=dict)
    _placement: Placement | None = None
    build_gpus: int = 1  # GPUs this process may spread a supernet build over (a Ray build actor's share)

    _fetched: set[str] = field(default_factory=set)

    def fetch(self, key: str) -> Path:
        """Local copy of a committed artefact, checked against its manifest once per process.

        The cache outlives processes (a resumed run reuses it): a file left there by an earlier process is trusted
        only if its sha256 is the one committed now (the run may have been deleted and redone under the same id),
        and is fetched again otherwise.
        """
        path = self.cache / key
        with self.lock:
            if key in self._fetched:
                return path
            if not path.is_file() or hash_file(path)[0] != read_manifest(self.store, key).sha256:
                fetch_verified(self.store, key, path)
            self._fetched.add(key)
        return path

    @property
    def placement(self) -> Placement:
        """The run's device and device-memory budget (``device``, ``device_memory_mb``), resolved once."""
        with self.lock:
            if self._placement is None:
                self._placement = placement(self.config)
            return self._placement

    @property
    def model(self) -> LayerwiseModel:
        with self.lock:
            if self._model is None:
                folder = resolve_model(self.config.model.source, revision=self.config.model.revision)
                dtype = getattr(torch, self.config.model.dtype)
                model = LayerwiseModel(folder, dtype, self.config.model.trust_remote_code, self.placement.device)
                check_fits(model, self.config, self.placement)
                self._model = model
            return self._model

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer, loaded once per process (calibrate and every export need it; a load is ~1 s)."""
        with self.lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.model.folder)
            return self._tokenizer

    def plan(self, iteration: int) -> dict:
        """An iteration's committed plan, read once per process (it never changes once committed; every local-prune,
        layer-stats and accumulate task of the iteration needs it)."""
        with self.lock:
            if iteration not in self._plans:
                self._plans[iteration] = read_json(self.store, keys.plan_key(iteration))
            return self._plans[iteration]

    def calibration(self) -> torch.Tensor:
        return self._windows(keys.calibration_key())

    def heldout(self) -> torch.Tensor:
        return self._windows(keys.calibration_key("heldout"))

    def _windows(self, key: str) -> torch.Tensor:
        return load_tensors(self.fetch(key), f"calibration windows {key!r}", ("windows",))["windows"]

    def search_windows(self) -> torch.Tensor:
        """The windows the search's fitness scores (the teacher's): the validation split, disjoint from the windows
        the copies are refitted on, or the first calibration windows when there is none."""
        if self.config.calibration.validation_windows:
            return self._windows(keys.calibration_key("validation"))
        return self.calibration()

    def build_devices(self) -> list[torch.device]:
        """The devices the supernet build spreads over: the run's device, and on CUDA with ``build_gpus`` > 1 that
        many visible GPUs from it on (in a Ray actor, the GPUs Ray assigned it, visible as cuda:0..G-1)."""
        device = self.placement.device
        if device.type != "cuda" or self.build_gpus <= 1:
            return [device]
        first = device.index or 0
        count = max(1, min(self.build_gpus, torch.cuda.device_count() - first))
        return [torch.device("cuda", first + k) for k in range(count)]

    def cursor(self, iteration: int, sublayers: Iterable[Sublayer]) -> LayerCursor:
        with self.lock:
            if iteration not in self._cursors:
                self.end_build()  # one build at a time: free the previous iteration's activations
                budget = self.placement.budget_bytes // 2  # the other half: the block, its Hessians, the prunes
                settings = prune_settings(self.config.prune, spill_dir=self.cache, device_budget_bytes=budget)
                settings = replace(settings, devices=tuple(self.build_devices()))  # the copies' bits do not move
                self._cursors[iteration] = LayerCursor(self.model, self.calibration(), settings, list(sublayers))
            return self._cursors[iteration]

    def keep_committed_copy(self, key: str, copy: PrunedSublayer) -> None:
        """Hold a copy this process has just committed until its layer is replayed (``accumulate``), as the tensors
        that were serialised, so that the replay does not read back from the store what it has just written: on
        SmolLM2 that read-back (fetch, sha256, load) of 18 copies a layer was twice the replay's own compute
        (py-spy). At most one layer's copies are held; they are produced in this process's memory anyway."""
        as_serialised = PrunedSublayer(**stored_tensors(copy))
        with self.lock:
            self._fresh[key] = as_serialised

    def end_build(self) -> None:
        """The supernet is committed: free the build's cursor (the calibration activations, gigabytes on a 70B model,
        and the last layer's Hessians) and any copies still held, before the search loads its model."""
        with self.lock:
            self._cursors = {}
            self._fresh = {}

    def copies(
        self, iteration: int, sublayers: Iterable[Sublayer], layer: int
    ) -> dict[Kind, dict[int, PrunedSublayer]]:
        """Committed copies of one layer, by kind and level (for replaying the layer): those this process committed
        and still holds, else from the store (a fresh worker resuming the build). The two are bit-identical."""

        def committed(sub: Sublayer, level: int) -> PrunedSublayer:
            key = keys.copy_key(iteration, layer, sub.kind, level)
            with self.lock:
                held = self._fresh.pop(key, None)
            if held is not None:
                return held
            return load_copy(self.fetch(key), sub.groups, sub.groups - sub.removed(level), f"supernet copy {key!r}")

        return {s.kind: {lv: committed(s, lv) for lv in s.levels} for s in sublayers if s.layer == layer}

    def reader(self, iteration: int) -> SupernetReader:
        index = read_json(self.store, keys.supernet_index_key(iteration))
        return SupernetReader(self.cache, index=index, fetch=self.fetch)

    def dense_model(self) -> torch.nn.Module:
        """The whole dense model in host memory (export; ``forward_model`` for what computes)."""
        from transformers import AutoModelForCausalLM

        folder, dtype = self.model.folder, self.model.dtype
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True).eval()

    def forward_model(self) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        """A dense model that computes on the run's device, and its ``input_ids -> logits``: the model's own forward
        when it is resident there, else its decoder blocks streamed through the device (teacher, evaluation)."""
        model = self.dense_model()
        forward = resident_or_streamed(model, [], self.placement, 0)
        if forward.streamer is None:
            device = self.placement.device
            return model, lambda ids: model(ids.to(device)).logits
        return model, lambda ids: forward.logits(ids, [])

    def hidden_layers(self) -> list[int]:
        """The decoder layers the fitness's hidden-state term compares; empty when the term is off."""
        return self.config.search.hidden_layer_ids(self.model.geometry.num_layers)

    def teacher_forward(self) -> tuple[LogitsFn, Captured | None]:
        """The dense model's ``input_ids -> logits`` for the teacher cache, and the outputs of ``hidden_layers`` of
        each forward when the hidden-state term is on (else ``None``)."""
        return teacher_forward(self.dense_model(), self.placement, self.hidden_layers())

    def search_model(self, iteration: int) -> tuple[SupernetModel, PrefixForward]:
        """The one resident model for the search; candidates swap only the sublayers whose level changed, and
        their forwards share the parent's unchanged layers (``search.prefix_sharing``)."""
        with self.lock:
            if iteration not in self._search:
                self._search = {}  # one resident model: drop the previous iteration's
                dense = self.dense_model()
                dense.config._attn_implementation = "sdpa"
                reader = self.reader(iteration)
                budget = (2 << 30) if self.config.search.prefix_sharing else 0
                forward = resident_or_streamed(dense, reader.sublayers, self.placement, budget)
                forward.capture = tuple(self.hidden_layers())
                self._search[iteration] = (SupernetModel(dense, reader, self.model.geometry), forward)
            return self._search[iteration]


_WORKSPACES: dict[RunRef, Workspace] = {}
_GUARD = threading.Lock()


def workspace(ref: RunRef) -> Workspace:
    """This process's workspace for a run (created on first use from the run's committed ``run.json``)."""
    with _GUARD:
        if ref not in _WORKSPACES:
            store = run_store(ref.store_url, ref.run_id, endpoint_url=ref.endpoint_url)
            saved = read_json(store, keys.RUN_CONFIG)
            config = load_run_config(saved["config"], origin=keys.RUN_CONFIG)
            cache = private_dir(default_cache_dir() / "runs" / _location_tag(ref) / ref.run_id)
            cache.chmod(0o700)  # a cache made before its folders were private: the copies inside are the store's
            _WORKSPACES[ref] = Workspace(ref, store, config, cache, saved.get("incarnation", ""))
        return _WORKSPACES[ref]


def cache_scope(ref: RunRef) -> str:
    """What a task's cached Prefect result is valid for: this run id, in this store, in this incarnation of the run.

    Prefect's result cache outlives the store's contents: keyed by run id alone, the same id in another store, or a
    run deleted and redone, came back ``Cached`` without committing anything, and the next task found nothing.
    """
    return f"{ref.run_id}-{_location_tag(ref)}-{workspace(ref).incarnation[:12]}"


def _location_tag(ref: RunRef) -> str:
    """A short, credential-free name for the store a run lives in: runs of one id in two stores never share a cache."""
    return hashlib.sha256(f"{ref.store_url}\n{ref.endpoint_url or ''}".encode()).hexdigest()[:12]


def forget(ref: RunRef) -> None:
    with _GUARD:
        _WORKSPACES.pop(ref, None)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()
