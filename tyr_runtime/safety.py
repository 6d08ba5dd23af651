"""Settings that run code on the worker are the deployment's to allow, not the caller's: anyone who can create a flow
run through the Prefect API can set flow parameters (``overrides``, a config file's path), so a run of a deployment
refuses them unless the deployment itself opts in with ``TYR_ALLOW_REMOTE_CODE=1`` in its environment (its job
variables). Runs started by the code's own user (``tyr prune``, a script calling the flow) are not deployments'."""

from __future__ import annotations

import os

from tyr_core.config import RunConfig
from tyr_core.errors import ConfigError

ALLOW_ENV = "TYR_ALLOW_REMOTE_CODE"
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
