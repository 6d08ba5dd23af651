"""Where runs live: ``--store``/``$TYR_STORE_URL``, or the embedded SeaweedFS for the duration of a command."""

from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tyr_core import keys
from tyr_core.errors import ConfigError

from .common import environment, err_console, refusing

if TYPE_CHECKING:
    from tyr_core.store import Store


@dataclass(frozen=True)
class StoreLocation:
    """Where runs live: a store base URL (``<base>/runs/<run id>/``) and, for S3, its endpoint."""

    url: str
    endpoint_url: str | None = None
    embedded: bool = False

    def base(self) -> Store:
        from tyr_runtime.storage import open_store

        return open_store(self.url, self.endpoint_url)

    def run(self, run_id: str) -> Store:
        from tyr_runtime.storage import run_store

        return run_store(self.url, run_id, endpoint_url=self.endpoint_url)


def open_location(args: argparse.Namespace, stack: contextlib.ExitStack) -> StoreLocation:
    """``--store``/``$TYR_STORE_URL`` if given (its URL checked now), else the embedded SeaweedFS for this command."""
    url = getattr(args, "store", None) or os.environ.get("TYR_STORE_URL")
    endpoint = getattr(args, "endpoint_url", None) or os.environ.get("TYR_S3_ENDPOINT_URL") or None
    if not url:
        return start_embedded(stack)
    location = StoreLocation(url, endpoint)
    with refusing():
        location.base()  # a bad scheme, bucket name or prefix is refused before anything starts
    return location


def start_embedded(stack: contextlib.ExitStack, data_dir: Path | None = None) -> StoreLocation:
    """Start the embedded SeaweedFS (stopped when ``stack`` closes) and point this process's S3 clients at it."""
    from tyr_runtime.seaweed import EmbeddedSeaweed

    with refusing():
        s3 = stack.enter_context(EmbeddedSeaweed(data_dir))
    creds = s3.client_options()
    # The tasks read credentials from the environment: the embedded server's own generated pair (kept 0600 in its
    # data folder), so the user's own credentials are never sent to it.
    stack.enter_context(
        environment(
            AWS_ACCESS_KEY_ID=creds["access_key"], AWS_SECRET_ACCESS_KEY=creds["secret_key"], AWS_SESSION_TOKEN=None
        )
    )
    shared = ", already running for another tyr command" if s3.joined else ""
    err_console.print(f"[dim]embedded S3 store: SeaweedFS at {s3.endpoint_url}{shared}, data in {s3.data_dir}[/dim]")
    return StoreLocation(s3.store_url, s3.endpoint_url, embedded=True)


def existing_run_store(location: StoreLocation, run_id: str) -> Store:
    """The store of a run that must exist; checked on the base store so that a typo creates nothing."""
    from tyr_runtime.storage import check_run_id

    base = location.base()
    if not base.exists(keys.run_prefix(check_run_id(run_id)) + keys.manifest_key(keys.RUN_CONFIG)):
        raise ConfigError(f"run {run_id!r} does not exist in {base.url} (tyr runs lists the runs there)")
    return location.run(run_id)
