"""The commit protocol: an artefact is committed by writing its bytes under a content-addressed object key
(``keys.object_key``), then its manifest (sha256, size, producing config hash, the object's key) with a conditional
create. Readers trust manifests only, follow them to the object and verify hashes. A committed object is never
overwritten: another writer's bytes go to another object, and its manifest loses the conditional create."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import keys
from ..errors import ArtefactError, CorruptArtefactError, MissingArtefactError, StoreError
from .filestore import write_advice
from .protocol import CHUNK_BYTES, TEMP_PREFIX, Store, check_key

log = logging.getLogger(__name__)


class Manifest(BaseModel):
    """What commits an object: its hash and size, the config that produced it, and task metadata."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    key: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    config_hash: str
    meta: dict[str, Any] = Field(default_factory=dict)
    created: float = 0.0  # Unix time of the commit
    object: str | None = None  # the key that holds the bytes; None: ``key`` itself (runs committed before)

    @property
    def stored_at(self) -> str:
        return self.object or self.key


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: Path) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a local file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def sha256_path(path: Path) -> str:
    return hash_file(path)[0]


def _new_manifest(key: str, digest: str, size: int, config_hash: str, meta: dict | None) -> Manifest:
    return Manifest(
        key=key,
        sha256=digest,
        size=size,
        config_hash=config_hash,
        meta=meta or {},
        created=time.time(),
        object=keys.object_key(key, digest),
    )


def _committed_or_none(store: Store, key: str) -> Manifest | None:
    try:
        return read_manifest(store, key)
    except MissingArtefactError:
        return None


def _same_or_conflict(store: Store, existing: Manifest, attempt: Manifest) -> Manifest:
    if existing.sha256 == attempt.sha256:
        log.debug("%s is already committed with the same bytes", attempt.key)
        return existing
    raise ArtefactError(
        f"{attempt.key!r} in {store.url} is already committed with other bytes (committed sha256 {existing.sha256}, "
        f"this attempt {attempt.sha256}): another process produced it differently; the committed artefact is "
        f"untouched. Make sure one process drives the run; to recompute it, delete {keys.manifest_key(attempt.key)!r} "
        "and resume."
    )


def _publish_manifest(store: Store, manifest: Manifest) -> Manifest:
    body = manifest.model_dump_json(indent=1).encode()
    if store.put_if_absent(keys.manifest_key(manifest.key), body):
        log.debug("committed %s (%d bytes, sha256 %s)", manifest.key, manifest.size, manifest.sha256[:12])
        return manifest
    existing = read_manifest(store, manifest.key)  # another writer committed first
    if existing.stored_at != manifest.stored_at:
        store.delete(manifest.stored_at)  # never committed: the object our attempt wrote is nobody's
    return _same_or_conflict(store, existing, manifest)


def commit_bytes(store: Store, key: str, data: bytes, config_hash: str, meta: dict | None = None) -> Manifest:
    """Write ``data`` at ``key``, then commit it with a manifest (conditional create).

    Idempotent: if ``key`` is already committed with the same sha256, nothing is written and the existing
    manifest is returned.

    Raises:
        ArtefactError: ``key`` is committed with different bytes.
        StoreError: the store refused or could not be reached.
    """
    attempt = _new_manifest(check_key(key), sha256_bytes(data), len(data), config_hash, meta)
    existing = _committed_or_none(store, key)
    if existing is not None:
        return _same_or_conflict(store, existing, attempt)
    store.put_bytes(attempt.stored_at, data)
    return _publish_manifest(store, attempt)


def commit_file(store: Store, key: str, path: Path, config_hash: str, meta: dict | None = None) -> Manifest:
    """Like ``commit_bytes`` for a local file, streamed (multi-GB copies and exports)."""
    digest, size = hash_file(Path(path))
    attempt = _new_manifest(check_key(key), digest, size, config_hash, meta)
    existing = _committed_or_none(store, key)
    if existing is not None:
        return _same_or_conflict(store, existing, attempt)
    store.put_file(attempt.stored_at, Path(path))
    return _publish_manifest(store, attempt)


def canonical_json(obj: Any) -> bytes:
    """``obj`` as JSON with sorted keys, so equal objects commit equal bytes."""
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def commit_json(store: Store, key: str, obj: Any, config_hash: str, meta: dict | None = None) -> Manifest:
    """Commit ``obj`` as canonical JSON (sorted keys), so equal objects commit equal bytes."""
    return commit_bytes(store, key, canonical_json(obj), config_hash, meta)


def is_committed(store: Store, key: str) -> bool:
    return store.exists(keys.manifest_key(key))


def remaining(store: Store, *artefacts: str) -> list[str]:
    """Those of ``artefacts`` not committed yet, in order: what a resumed run still has to compute. The tasks
    (``commit_once``), their Prefect cache keys and the flow's skips all ask this. An export prefix (ending in '/')
    is committed once its file list is."""
    return [a for a in artefacts if not is_committed(store, a + keys.EXPORT_MARKER if a.endswith("/") else a)]


def commit_once(store: Store, key: str, produce: Callable[[], bytes], config_hash: str) -> bytes:
    """The committed bytes of ``key``: ``produce``d and committed if the run has not committed them yet, else read
    back and verified. ``produce`` may commit other artefacts first (an index's shards, an export's files): ``key``
    commits last, so once it is committed they all are.

    Raises:
        ArtefactError: another process committed ``key`` with other bytes meanwhile.
        MissingArtefactError, CorruptArtefactError: as ``read_verified``.
    """
    if remaining(store, key):
        data = produce()
        commit_bytes(store, key, data, config_hash)  # returns only if what is committed now is ``data``
        return data
    return read_verified(store, key)


def commit_json_once(store: Store, key: str, produce: Callable[[], Any], config_hash: str) -> Any:
    """``commit_once`` for a JSON artefact, encoded as ``commit_json`` does; the committed value, parsed."""
    return _parse_json(store, key, commit_once(store, key, lambda: canonical_json(produce()), config_hash))


def read_manifest(store: Store, key: str) -> Manifest:
    """The manifest that commits ``key``.

    Raises:
        MissingArtefactError: ``key`` is not committed.
        CorruptArtefactError: the manifest is unreadable or commits another key.
    """
    mkey = keys.manifest_key(key)
    try:
        body = store.get_bytes(mkey)
    except MissingArtefactError:
        raise MissingArtefactError(f"artefact {key!r} is not committed in {store.url} (no manifest)") from None
    try:
        manifest = Manifest.model_validate_json(body)
    except ValidationError as err:
        raise CorruptArtefactError(
            f"the manifest {mkey!r} in {store.url} is unreadable ({err.error_count()} problems); "
            f"delete it and {key!r}, then resume to recompute the artefact"
        ) from None
    if manifest.key != key:
        raise CorruptArtefactError(f"the manifest {mkey!r} in {store.url} commits {manifest.key!r}, not {key!r}")
    if manifest.object is not None and manifest.object != keys.object_key(key, manifest.sha256):
        raise CorruptArtefactError(
            f"the manifest {mkey!r} in {store.url} names the object {manifest.object!r}, not the one its sha256 "
            f"names; delete {mkey!r}, then resume to recompute the artefact"
        )
    return manifest


def _corrupt(store: Store, key: str, manifest: Manifest, actual: str, size: int) -> CorruptArtefactError:
    return CorruptArtefactError(
        f"artefact {key!r} in {store.url} is corrupt: sha256 {actual} ({size} bytes) but its manifest says "
        f"{manifest.sha256} ({manifest.size} bytes); delete {keys.manifest_key(key)!r} and {manifest.stored_at!r}, "
        "then resume the run to recompute it"
    )


def _object_missing(store: Store, key: str, manifest: Manifest) -> MissingArtefactError:
    return MissingArtefactError(
        f"artefact {key!r} has a manifest but no object ({manifest.stored_at!r}) in {store.url}; delete "
        f"{keys.manifest_key(key)!r} and resume the run to recompute it"
    )


def read_verified(store: Store, key: str) -> bytes:
    """The committed bytes of ``key``, checked against its manifest's sha256.

    Raises:
        MissingArtefactError: no manifest, or a manifest without its object.
        CorruptArtefactError: the bytes do not match the manifest (the message names both hashes).
    """
    manifest = read_manifest(store, key)
    try:
        data = store.get_bytes(manifest.stored_at)
    except MissingArtefactError:
        raise _object_missing(store, key, manifest) from None
    actual = sha256_bytes(data)
    if actual != manifest.sha256:
        raise _corrupt(store, key, manifest, actual, len(data))
    return data


def read_json(store: Store, key: str) -> Any:
    """A committed JSON artefact, verified, parsed."""
    return _parse_json(store, key, read_verified(store, key))


def _parse_json(store: Store, key: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as err:
        raise ArtefactError(f"artefact {key!r} in {store.url} is not JSON ({err}); it was committed that way") from None


def private_dir(path: Path) -> Path:
    """``path`` as a folder, each folder created on the way readable by its owner only (0700); folders that exist
    keep their mode.

    Raises:
        OSError: as ``mkdir``.
    """
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        folder.chmod(0o700)  # a umask may have cleared bits, never added: set it whatever the umask
    return path


def fetch_verified(store: Store, key: str, path: Path) -> Path:
    """Download a committed object to ``path`` and verify its sha256 before it appears there.

    The download goes to a temp file beside ``path`` and is renamed into place only once verified, so ``path``
    never holds bad bytes; a bad download is deleted. The file is its owner's only (0600), in folders created 0700:
    artefacts (calibration text, weights) are no more readable where they are copied than in the store.

    Raises:
        MissingArtefactError, CorruptArtefactError: as ``read_verified``.
    """
    manifest, path = read_manifest(store, key), Path(path)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(6)}")
    try:
        private_dir(path.parent)
        store.get_file(manifest.stored_at, tmp)
        actual, size = hash_file(tmp)
        if actual != manifest.sha256:
            raise _corrupt(store, key, manifest, actual, size)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except MissingArtefactError:
        raise _object_missing(store, key, manifest) from None
    except OSError as err:
        raise StoreError(f"could not save {key!r} to {path}: {err.strerror or err}; {write_advice(err)}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def uncommit(store: Store, key: str) -> None:
    """Remove a committed artefact: manifest first, so a crash never leaves a manifest without its object."""
    try:
        stored_at = read_manifest(store, key).stored_at
    except (MissingArtefactError, CorruptArtefactError):
        stored_at = key
    store.delete(keys.manifest_key(key))
    store.delete(stored_at)
