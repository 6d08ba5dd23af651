"""What the caller of a deployment may set, and what stays the deployment's.

Anyone who can create a flow run through the Prefect API sets its parameters. In a run of a deployment, the caller
may tune the method (``METHOD_SECTIONS`` and ``METHOD_SETTINGS`` through ``overrides``, the sparsity and search
sizes, the run id, a recipe by name, a hub model or alias); what names a place on the worker or elsewhere (files and
datasets to read, their text fields, the store, the S3 endpoint, a Ray cluster's address, a config file, a local
model), or runs code (``model.trust_remote_code``), comes from the deployment's own parameters. A deployment opts in
to more through its job variables' env: ``TYR_ALLOW_PARAMETERS`` (comma-separated settings or parameter names, ``*``
for all) and ``TYR_ALLOW_REMOTE_CODE=1``. Runs started by the code's own user (``tyr prune``, a script calling the
flow) are not deployments' and are not limited.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tyr_core.config import RunConfig
from tyr_core.errors import ConfigError
from tyr_core.redaction import redact

ALLOW_ENV = "TYR_ALLOW_REMOTE_CODE"
ALLOW_PARAMETERS_ENV = "TYR_ALLOW_PARAMETERS"
# the method's settings, which a deployment's caller may override: budgets, sizes, seeds, formats; nothing that names
# a file, a dataset, a text field, a device, an address or a store
METHOD_SECTIONS = ("prune", "search", "teacher", "export")
METHOD_SETTINGS = (
    "calibration.num_windows",
    "calibration.seq_len",
    "calibration.seed",
    "calibration.validation_windows",
    "calibration.chunking",
    "eval.seq_len",
    "eval.max_windows",
    "eval.baselines",
    "keep_last",
    "seed",
    "deterministic",
    "concurrent_prunes",
    "torch_threads",
)
# setting -> why it is dangerous
DANGEROUS = {"model.trust_remote_code": "imports and runs the Python files that come with the model"}


def _deployment_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        found = flow_run.deployment_id
    except Exception:  # outside a flow run
        return None
    return str(found) if found else None


def dangerous_settings(config: RunConfig) -> list[str]:
    """The settings of ``config`` that run code on the worker."""
    return ["model.trust_remote_code"] if config.model.trust_remote_code else []


def refuse_dangerous_settings(config: RunConfig) -> None:
    """Raise ``ConfigError`` when a deployment's run sets something that runs code, unless the deployment allows it."""
    found = dangerous_settings(config)
    if not found or os.environ.get(ALLOW_ENV) == "1":
        return
    deployment = _deployment_id()
    if deployment is None:
        return
    raise ConfigError(
        f"{', '.join(f'{name}=true ({DANGEROUS[name]})' for name in found)} is refused in a run of deployment "
        f"{deployment}: flow parameters come from whoever can reach the Prefect API. If this deployment should run "
        f"such models, set {ALLOW_ENV}=1 in its job variables' env"
    )


def _deployment_parameters(deployment: str) -> dict[str, Any]:
    """The deployment's own parameters (not the caller's), read from the API; {} where they cannot be read."""
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return dict(client.read_deployment(deployment).parameters or {})
    except Exception:  # no API (a mocked deployment id) or no such deployment: nothing is the deployment's own
        return {}


def _allowed_by_env() -> set[str]:
    return {name.strip() for name in os.environ.get(ALLOW_PARAMETERS_ENV, "").split(",") if name.strip()}


def is_method_setting(key: str) -> bool:
    """Whether an override's key (``section.field``, or a whole ``section``) only tunes the method."""
    return key in METHOD_SETTINGS or key.split(".", 1)[0] in METHOD_SECTIONS


def _is_place(value: str) -> bool:
    """A model or preset argument that names a file or folder (not a hub name, alias or shorthand)."""
    return value.endswith((".gguf", ".yaml", ".yml")) or value.startswith(("/", ".", "~")) or Path(value).exists()


def refuse_caller_parameters(
    *,
    model: str | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    store_url: str | None = None,
    endpoint_url: str | None = None,
) -> None:
    """In a run of a deployment, raise ``ConfigError`` naming the first parameter or setting that the caller may not
    set: an override outside the method's settings, a store or endpoint URL, a local model or config file, unless
    the deployment's own parameters hold the same value or its env allows it (``TYR_ALLOW_PARAMETERS``)."""
    deployment = _deployment_id()
    allowed = _allowed_by_env()
    if deployment is None or "*" in allowed:
        return
    own = _deployment_parameters(deployment)
    own_overrides = set(own.get("overrides") or [])

    def refuse(name: str, what: str) -> ConfigError:
        return ConfigError(
            f"{name} {what} is refused in a run of deployment {deployment}: flow parameters come from whoever can "
            f"reach the Prefect API, and {name} is the deployment's to choose. Put it in the deployment's own "
            f"parameters, or allow callers to set it with {ALLOW_PARAMETERS_ENV}={name} in its job variables' env"
        )

    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        remote_code = key == "model.trust_remote_code" and os.environ.get(ALLOW_ENV) == "1"  # its own opt-in
        if not (is_method_setting(key) or item in own_overrides or key in allowed or remote_code):
            raise refuse(key, "(an override outside the method's settings)")
    for name, value in (("store_url", store_url), ("endpoint_url", endpoint_url)):
        if value is not None and value != own.get(name) and name not in allowed:
            raise refuse(name, f"({redact(value)!r})")
    for name, value in (("model", model), ("preset", preset)):
        if value is not None and _is_place(value) and value != own.get(name) and name not in allowed:
            raise refuse(name, f"({value!r}, a file or folder on the worker)")
