"""Store URLs: the factory that turns ``file://``, a plain path or ``s3://BUCKET/PREFIX`` into a ``Store``, the store
of one run, and the probe that proves a store usable before a run starts."""

from __future__ import annotations

import re
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

from tyr_core import keys
from tyr_core.errors import ConfigError, StoreError
from tyr_core.redaction import has_userinfo, redact
from tyr_core.store import FileStore, Store

from .lock import write_guard
from .s3 import S3Store

SCHEMES = "file:///PATH, a plain path, or s3://BUCKET/PREFIX"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # whole string: '$' would let a trailing newline in
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two letters at least: never a drive letter


def open_store(url: str, endpoint_url: str | None = None, **options: Any) -> Store:
    """The store a URL names.

    Args:
        url: ``file:///PATH`` or a plain path -> ``FileStore``; ``s3://BUCKET/PREFIX`` -> ``S3Store``.
        endpoint_url: the S3 endpoint (ignored for file stores).
        **options: ``S3Store`` keyword arguments (credentials, region, timeouts, transfer sizes).

    Raises:
        ConfigError: the URL is empty, malformed or has another scheme.
    """
    if not url or not url.strip():
        raise ConfigError(f"the store URL is empty; use {SCHEMES}")
    if has_userinfo(endpoint_url):
        raise ConfigError(
            f"the S3 endpoint URL {redact(str(endpoint_url))!r} holds credentials; give them through the AWS chain "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, an instance role) or a credentials block, never in "
            "a URL (URLs are logged and kept as flow parameters)"
        )
    if url.startswith("s3://"):
        return _open_s3(url, endpoint_url, options)
    if url.startswith("file:"):
        return FileStore(_file_url_path(url))
    if _URL_SCHEME.match(url):
        raise ConfigError(f"store URL {redact(url)!r} has an unsupported scheme; use {SCHEMES}")
    return FileStore(url)


def _open_s3(url: str, endpoint_url: str | None, options: dict[str, Any]) -> S3Store:
    parts = urlsplit(url)
    if not parts.netloc or parts.query or parts.fragment or "@" in parts.netloc or has_userinfo(url):
        raise ConfigError(
            f"store URL {redact(url)!r} is not s3://BUCKET/PREFIX (no credentials, query or fragment in it)"
        )
    try:
        return S3Store(parts.netloc, unquote(parts.path), endpoint_url=endpoint_url, **options)
    except StoreError as err:  # an invalid prefix
        raise ConfigError(f"store URL {redact(url)!r}: {err}") from None


def _file_url_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/") or parts.query or parts.fragment:
        raise ConfigError(f"store URL {redact(url)!r} is not file:///ABSOLUTE/PATH (a plain path works too)")
    return unquote(parts.path)


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it can name a run's folder; raise ``ConfigError`` otherwise."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ConfigError(
            f"invalid run id {run_id!r}: use 1-128 letters, digits, '-', '_' or '.', starting with a letter or "
            "digit (no '/')"
        )
    return run_id


def run_store(base_url: str, run_id: str, endpoint_url: str | None = None, **options: Any) -> Store:
    """The store scoped to one run, ``<base>/runs/<run_id>/``: nothing a run does can leave that prefix. Its writes
    are refused once this process has lost the run's lock (``lock.write_guard``)."""
    sub = keys.run_prefix(check_run_id(run_id))
    base = open_store(base_url, endpoint_url, **options)
    store = base.scoped(sub)  # a FileStore refuses a run folder (or runs/) that is a symbolic link
    store.write_guard = write_guard(store)
    return store


def check_store(store: Store, *, write_probe: bool = True) -> None:
    """A cheap probe before a run starts: fail early, with a clear message, if the store is unusable.

    Checks that the endpoint answers, the credentials work and the bucket or folder exists (one LIST). With
    ``write_probe`` it also creates a probe key twice and deletes it: the second create must be refused, or the
    server ignores conditional writes and the commit protocol could not tell two writers apart.

    Raises:
        StoreError (StoreUnreachableError, StoreCredentialsError, NoSuchBucketError): the store is unusable.
    """
    check = getattr(store, "check", None)
    if callable(check):
        check()
    else:
        store.list(keys.RUN_CONFIG)
    if write_probe:
        _probe_conditional_create(store)


def _probe_conditional_create(store: Store) -> None:
    key = keys.probe_key(uuid.uuid4().hex)
    if not store.put_if_absent(key, b"{}"):
        raise StoreError(f"{store.url} refused to create the fresh probe key {key!r}; is the store read-only?")
    try:
        ignored = store.put_if_absent(key, b"{}")
    finally:
        store.delete(key)
    if ignored:
        raise StoreError(
            f"{store.url} ignores conditional writes (PutObject with If-None-Match: *), which tyr's commits need; "
            "use a server that honours them (AWS S3, SeaweedFS, MinIO, Ceph)"
        )
