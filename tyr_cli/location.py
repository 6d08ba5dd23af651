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

from .common import environment, err_console, refusing, without_userinfo

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


def configured_location(args: argparse.Namespace) -> StoreLocation | None:
    """``--store``/``$TYR_STORE_URL`` checked now (scheme, bucket, prefix, an endpoint that listens); None: the
    embedded SeaweedFS, which ``open_location`` starts. Nothing is started here."""
    url = getattr(args, "store", None) or os.environ.get("TYR_STORE_URL")
    endpoint = getattr(args, "endpoint_url", None) or os.environ.get("TYR_S3_ENDPOINT_URL") or None
    if not url:
        return None
    location = StoreLocation(url, endpoint)
    with refusing():
        location.base()  # a bad scheme, bucket name or prefix is refused before anything starts
        if endpoint and url.startswith("s3://"):
            check_endpoint_listens(endpoint)
    return location


def check_endpoint_listens(endpoint: str, timeout: float = 5.0) -> None:
    """An S3 endpoint where nothing listens is named as such: without credentials the S3 client would report
    missing credentials first, which sends a person to the wrong fix."""
    import socket
    from urllib.parse import urlsplit

    from tyr_core.errors import StoreError

    parts = urlsplit(endpoint)
    if not parts.hostname:
        raise ConfigError(f"S3 endpoint URL {without_userinfo(endpoint)!r} has no host: give http(s)://HOST:PORT")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise StoreError(
            f"cannot reach the S3 endpoint {without_userinfo(endpoint)} ({reason}): start the server (tyr store serve) "
            "or fix --endpoint-url / TYR_S3_ENDPOINT_URL"
        ) from None


def open_location(args: argparse.Namespace, stack: contextlib.ExitStack) -> StoreLocation:
    """``--store``/``$TYR_STORE_URL`` if given (its URL checked now), else the embedded SeaweedFS for this command."""
    return configured_location(args) or start_embedded(stack)


def embedded_data_dir() -> Path:
    """The embedded SeaweedFS's data folder, as ``tyr_core.families.default_cache_dir`` places it (read here so that a
    command reading the store does not import torch)."""
    return Path(os.environ.get("TYR_CACHE") or Path.home() / ".cache" / "tyr") / "seaweedfs"


def open_existing_location(args: argparse.Namespace, stack: contextlib.ExitStack) -> StoreLocation | None:
    """For a command that only reads: as ``open_location``, but None, starting nothing, where the embedded store has
    never held data."""
    configured = configured_location(args)
    if configured is None and not embedded_data_dir().is_dir():
        return None
    return configured or start_embedded(stack)


def start_embedded(stack: contextlib.ExitStack, data_dir: Path | None = None) -> StoreLocation:
    """Start the embedded SeaweedFS (stopped when ``stack`` closes) and point this process's S3 clients at it."""
    from tyr_runtime.seaweed import EmbeddedSeaweed

    with refusing():
        s3 = stack.enter_context(EmbeddedSeaweed(data_dir or embedded_data_dir()))
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
