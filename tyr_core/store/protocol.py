"""The ``Store`` protocol and the rule on keys that every implementation enforces."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import InvalidKeyError

CHUNK_BYTES = 4 << 20
# Temp files live beside their target (same filesystem, so the final rename is atomic). Keys may not use this
# prefix, so a listing never confuses a half-written temp file with an artefact.
TEMP_PREFIX = ".tmp-"


@runtime_checkable
class Store(Protocol):
    """Bytes under relative keys. Implementations validate every key with ``check_key``."""

    @property
    def url(self) -> str:
        """Where the store is, safe to log: never holds credentials."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist; False if it did (nothing written)."""
        ...

    def get_bytes(self, key: str) -> bytes: ...

    def put_file(self, key: str, path: Path) -> None: ...

    def get_file(self, key: str, path: Path) -> None: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative, sorted) that start with ``prefix``, as plain string prefixes like S3's."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a key that does not exist is not an error."""
        ...


@runtime_checkable
class SwapStore(Store, Protocol):
    """A store with compare-and-swap on single small objects (the run lock): a write or delete happens only if the
    object is still the version the caller read. ``FileStore`` and ``S3Store`` (``If-Match`` on the ETag) are."""

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """The bytes of ``key`` and a tag naming this version of them."""
        ...

    def replace_if(self, key: str, data: bytes, tag: str) -> str | None:
        """Write ``data`` at ``key`` only if ``key`` is still the version ``tag`` names: the new tag, or None (it
        changed or is gone; nothing written)."""
        ...

    def delete_if(self, key: str, tag: str) -> bool:
        """Delete ``key`` only if it is still the version ``tag`` names; False otherwise (nothing deleted)."""
        ...


WriteGuard = Callable[[str], None]  # called with the key before every write or delete; raises to refuse it


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key; raise ``InvalidKeyError`` otherwise.

    Rejects empty, absolute, '.'/'..' or empty segments, backslashes, control characters and the temp-file
    prefix, so no key can address anything outside the store's root or prefix.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"invalid artefact key {key!r}: keys are non-empty strings")
    if key.startswith("/") or "\\" in key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InvalidKeyError(
            f"invalid artefact key {key!r}: keys are relative, '/'-separated, without backslashes or control chars"
        )
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidKeyError(f"invalid artefact key {key!r}: keys have no empty, '.' or '..' segments")
    if any(p.startswith(TEMP_PREFIX) for p in parts):
        raise InvalidKeyError(f"invalid artefact key {key!r}: segments starting with {TEMP_PREFIX!r} are reserved")
    return key


def check_prefix(prefix: str) -> str:
    """Like ``check_key`` for listing prefixes: '' (everything) and a trailing '/' are allowed."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix
