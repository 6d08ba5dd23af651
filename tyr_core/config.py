"""Typed run configuration. Every model is frozen and rejects unknown fields; errors name the field path.

A run is described by one ``RunConfig`` (saved with the run as ``run.json``); each stage takes only its section.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(_Strict):
    source: str = Field("smollm2-135m", description="local HF folder, .gguf file, hub name, or 'smollm2-135m'")
    revision: str | None = Field(None, description="hub revision (hub names only)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="compute/storage dtype")
    trust_remote_code: bool = Field(False, description="allow custom code in the input model (off unless asked)")


class CalibrationConfig(_Strict):
    files: list[str] = Field(default_factory=list, description="local .txt/.json/.jsonl/.parquet files or folders")
    dataset: str | None = Field(None, description="dataset name, e.g. HuggingFaceFW/fineweb-edu")
    dataset_config: str | None = Field(None, description="dataset config, e.g. sample-10BT")
    data_files: list[str] | None = Field(None, description="files inside the dataset repo to read")
    split: str = "train"
    text_field: str = "text"
    chunking: Literal["packed", "reference"] = Field("packed", description="packed windows or per-document pieces")
    seq_len: int = Field(512, gt=1, description="tokens per window")
    num_windows: int = Field(128, gt=0, description="windows (packed) or num_windows*seq_len tokens (reference)")
    seed: int = 0
    validation_windows: int = Field(
        64,
        ge=0,
        description="windows drawn after the calibration windows, disjoint from them, that the search's fitness "
        "scores (the teacher's windows); 0 scores the first calibration windows, as the reference does",
    )
    holdout: list[str] = Field(default_factory=list, description="files for held-out evaluation (whole works)")

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationConfig:
        if not self.files and not self.dataset:
            raise ValueError("give calibration.files or calibration.dataset")
        return self


class PruneConfig(_Strict):
    target_sparsity: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="fraction removed: of each kind's groups (budget=groups) or of the decoder's parameters (params)",
    )
    sparsity_tolerance: float = Field(0.02, ge=0.0, description="how far the whole-group target may be from it")
    budget: Literal["groups", "params"] = Field(
        "groups",
        description="groups: the target is each kind's share of heads and neurons (the reference); params: the share "
        "of decoder parameters physically removed, KV heads counted as the export removes them",
    )
    budget_tolerance: float = Field(
        0.005, gt=0.0, lt=0.5, description="budget=params: how far a candidate's removed fraction may be off target"
    )
    mlp_multiple: int = Field(
        1, ge=1, description="every MLP width (centres and steps) is a multiple of this (64 for GPU kernels; 1 any)"
    )
    num_levels: int = Field(9, ge=1, description="supernet copies per sublayer (odd)")
    interval: float = Field(0.125, gt=0.0, le=0.5, description="first iteration's step, fraction of groups")
    iterations: int = Field(4, ge=1, description="coarse-to-fine iterations; the interval halves each time")
    damping: float = Field(0.01, gt=0.0, description="fraction of mean(diag H) added to H")
    attn_rounds: int = Field(1, ge=1, description="head-removal rounds per copy")
    mlp_rounds: int = Field(16, ge=1, description="neuron-removal rounds per copy")
    accumulation: Literal["expectation", "centre", "none"] = Field("expectation", description="paper eq. 5 default")
    refit_target: Literal["pruned", "dense"] = Field(
        "pruned", description="fit the dense weight on pruned inputs (reference) or the dense model's outputs"
    )
    first_order: float = Field(
        0.0,
        ge=0.0,
        description="weight of the signed first-order term in the group saliency: 1 the reference, 0 pure OBS",
    )
    mlp_after_attention: bool = Field(
        False, description="collect the MLP's statistics after the same layer's attention takes its expected weight"
    )
    batch_size: int = Field(8, ge=1)
    activation_memory_mb: int = Field(4096, ge=1, description="calibration activations above this spill to disk")

    @model_validator(mode="after")
    def _mlp_after_attention_needs_pruned_refit(self) -> PruneConfig:
        if self.mlp_after_attention and self.refit_target == "dense":
            raise ValueError("mlp_after_attention works with refit_target=pruned only; unset one of them")
        return self

    @field_validator("num_levels")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("num_levels must be odd so the grid is centred")
        return v


def load_yaml(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides (values parsed as YAML) to a nested dict."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        path, raw = item.split("=", 1)
        node = out
        *parents, leaf = path.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return out


def validate(model: type[BaseModel], data: dict[str, Any], origin: str = "config") -> Any:
    """Build ``model`` from ``data``, turning pydantic's report into a ConfigError that names every field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"invalid {origin}:\n" + "\n".join(lines)) from None


def config_hash(config: BaseModel, exclude: set[str] | None = None) -> str:
    """Stable hash of the fields that determine artefacts (resume is refused when it changes)."""
    blob = json.dumps(config.model_dump(mode="json", exclude=exclude), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class EvalConfig(_Strict):
    files: list[str] = Field(default_factory=list, description="held-out text files (whole works, never calibration)")
    dataset: str | None = Field(None, description="dataset name for held-out text (users with a network)")
    dataset_config: str | None = None
    split: str = "test"
    text_field: str = "text"
    seq_len: int = Field(512, gt=1)
    max_windows: int = Field(16, ge=1, description="held-out windows scored (non-overlapping)")
    baselines: bool = Field(True, description="also score the dense, uniform and magnitude models")


ExportFormat = Literal["compact", "masked", "nemotron-nas", "gguf"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)


class ExportConfig(_Strict):
    formats: list[ExportFormat] = Field(
        default_factory=lambda: ["compact"], description="formats written at the end of a run (tyr export --help)"
    )
    plot: bool = Field(True, description="write the per-layer sparsity plot and JSON beside each export")
    gguf_type: Literal["f16", "f32", "q8_0"] = Field(
        "f16",
        description="weight type of the gguf export (norms stay f32; q8_0 keeps rows not in blocks of 32 in f16)",
    )


class TeacherConfig(_Strict):
    topk: int = Field(8192, ge=1, description="teacher logits kept per token for the KL fitness")
    windows_per_shard: int = Field(64, ge=1)
    max_windows: int | None = Field(
        None, ge=1, description="calibration windows the search scores on (teacher cache size); default all"
    )


class ExecutionConfig(_Strict):
    """Where the heavy steps run: in the flow's own process (``local``, the default) or in Ray actors (``ray``), which
    hold the devices across tasks; the flow, its tasks, commits and RNG stay in the flow's process either way."""

    engine: Literal["local", "ray"] = Field("local", description="local: in the flow's process; ray: in Ray actors")
    address: str | None = Field(
        None,
        min_length=1,
        description="Ray cluster to join (ray://HOST:10001, HOST:6379 or auto); None with engine=ray: a local cluster "
        "on loopback for the command, stopped after it",
    )
    replicas: int = Field(1, ge=1, le=1024, description="search replicas, each holding the search model")
    gpus_per_replica: float = Field(
        0.0, ge=0.0, le=64.0, description="GPUs each actor reserves (0 on CPU; fractions share a GPU)"
    )


def _search_config():
    from .search import SearchConfig

    return SearchConfig


MAX_CONCURRENT_PRUNES = 8  # the iteration flow's task runner has this many workers


# Settings of how a run executes, not of what it computes: they may change when a run resumes.
RUN_SETTINGS = {
    "eval",
    "export",
    "keep_last",
    "concurrent_prunes",
    "torch_threads",
    "device",
    "deterministic",
    "device_memory_mb",
    "execution",
}


class RunConfig(_Strict):
    """Everything a run needs; ``artefact_hash`` covers the sections that change committed artefacts."""

    model: ModelSource = Field(default_factory=ModelSource)
    calibration: CalibrationConfig
    prune: PruneConfig = Field(default_factory=PruneConfig)
    search: Any = Field(default_factory=lambda: _search_config()())
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    keep_last: int = Field(1, ge=1, description="iterations whose supernet survives garbage collection")
    concurrent_prunes: int = Field(
        1,
        ge=1,
        le=MAX_CONCURRENT_PRUNES,
        description="local-prune tasks that share one layer's levels and run at once; 1 on a CPU, where one prune "
        "uses every core",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch's intra-op threads in the run's process (None: one per core); 1 for models too small "
        "to split an op across cores",
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="where to compute: auto (CUDA if present), cpu, cuda:N"
    )
    deterministic: bool = Field(
        False, description="deterministic GPU kernels and cuBLAS workspace, so a GPU run reproduces itself (slower)"
    )
    device_memory_mb: int | None = Field(
        None, ge=1, description="device memory the run may plan to use (default: 90% of what is free when it starts)"
    )
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    seed: int = 0

    @field_validator("search", mode="before")
    @classmethod
    def _typed_search(cls, v: Any) -> Any:
        cfg = _search_config()
        return v if isinstance(v, cfg) else cfg.model_validate(v or {})

    @model_validator(mode="after")
    def _exchange_needs_a_parameter_budget(self) -> RunConfig:
        if self.search.exchange == "params" and self.prune.budget != "params":
            raise ValueError(
                "search.exchange=params trades heads for neurons at equal parameters: set prune.budget=params"
            )
        return self

    def artefact_hash(self) -> str:
        """Hash of what determines committed artefacts; eval/export/gc/concurrency/thread settings may change on
        resume (a different thread count may change a sum's rounding, as another host's would, not its meaning)."""
        return config_hash(self, exclude=RUN_SETTINGS)


def load_run_config(data: dict[str, Any], overrides: list[str] | None = None, origin: str = "config") -> RunConfig:
    return validate(RunConfig, apply_overrides(data, overrides or []), origin)
