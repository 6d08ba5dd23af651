"""Artefact stores, the commit protocol and garbage collection.

A ``Store`` maps relative keys ('/'-separated, inside one run's prefix) to bytes. Committing writes the object,
then a manifest (sha256, size, producing config hash) with a conditional create; readers trust manifests only
and verify hashes. ``FileStore`` backs ``file://`` URLs; the S3 store lives in ``tasks/storage.py``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import artifacts as keys
from .errors import (
    ArtefactError,
    ConfigError,
    CorruptArtefactError,
    InvalidKeyError,
    MissingArtefactError,
    StoreError,
)

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------------------------------- keys


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


# ----------------------------------------------------------------------------------------- local file helpers


def _fsync_dir(folder: Path) -> None:
    """Make a rename, link or unlink in ``folder`` durable (the entry lives in the directory, not the file)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_temp_beside(final: Path) -> tuple[int, Path]:
    """Create an empty temp file in ``final``'s folder (mode 0o666 less the umask, like any new file)."""
    for _ in range(3):  # the folder can vanish between mkdir and open when a GC tidies empty folders
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{TEMP_PREFIX}{final.name}.{secrets.token_hex(6)}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileNotFoundError:
            continue
    raise OSError(errno.ENOENT, "the folder kept disappearing", str(final.parent))


def _write_temp_beside(final: Path, fill: Callable[[BinaryIO], None]) -> Path:
    """Write a fsynced temp file next to ``final`` with ``fill``; on any error the temp file is removed.

    Raises:
        OSError: from the filesystem (a full disk, permissions); nothing is left behind.
    """
    fd, tmp = _open_temp_beside(final)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def _copy_from(path: Path) -> Callable[[BinaryIO], None]:
    def fill(dst: BinaryIO) -> None:
        with open(path, "rb") as src:
            while chunk := src.read(CHUNK_BYTES):
                dst.write(chunk)

    return fill


def _write_advice(err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: free space or point the store elsewhere, then resume"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the folder is not writable: fix its permissions or point the store elsewhere"
    return "check the disk and the folder, then resume"


def _is_not_found(err: OSError) -> bool:
    return isinstance(err, FileNotFoundError | IsADirectoryError | NotADirectoryError)


# ------------------------------------------------------------------------------------------------ FileStore


class FileStore:
    """A store in a local folder: atomic writes (temp file + rename, fsynced), conditional create by hard link.

    A failed write (full disk, permissions) raises ``StoreError`` naming the key, removes its temp file and
    leaves any object already committed at that key untouched.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(
                f"cannot create the store folder {self.root}: {err.strerror}; check the path and its permissions"
            ) from err

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_failed(self, key: str, err: OSError) -> StoreError:
        return StoreError(f"could not write {key!r} to {self.url}: {err.strerror or err}; {_write_advice(err)}")

    def _stage(self, key: str, fill: Callable[[BinaryIO], None]) -> Path:
        try:
            return _write_temp_beside(self._path(key), fill)
        except OSError as err:
            raise self._write_failed(key, err) from err

    def _publish(self, key: str, tmp: Path) -> None:
        final = self._path(key)
        try:
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise self._write_failed(key, err) from err

    def put_bytes(self, key: str, data: bytes) -> None:
        self._publish(key, self._stage(key, lambda f: f.write(data)))

    def put_file(self, key: str, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"cannot store {key!r}: the local file {path} does not exist")
        self._publish(key, self._stage(key, _copy_from(path)))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        final = self._path(key)
        tmp = self._stage(key, lambda f: f.write(data))
        try:
            os.link(tmp, final)  # atomic, and fails if the key exists: readers never see a partial object
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                return self._create_exclusive(key, data)  # filesystems without hard links
            raise self._write_failed(key, err) from err
        finally:
            tmp.unlink(missing_ok=True)
        try:
            _fsync_dir(final.parent)
        except OSError as err:
            raise self._write_failed(key, err) from err
        return True

    def _create_exclusive(self, key: str, data: bytes) -> bool:
        final = self._path(key)
        try:
            fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        except OSError as err:
            raise self._write_failed(key, err) from err
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
        except OSError as err:
            final.unlink(missing_ok=True)  # never leave a partial object that blocks the next attempt
            raise self._write_failed(key, err) from err
        return True

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as err:
            raise self._read_failed(key, err) from None

    def get_file(self, key: str, path: Path) -> None:
        src, dest = self._path(key), Path(path)
        if not src.is_file():
            raise MissingArtefactError(f"{key!r} is not in {self.url}")
        try:
            tmp = _write_temp_beside(dest, _copy_from(src))
            os.replace(tmp, dest)
        except OSError as err:
            if _is_not_found(err) and not src.is_file():
                raise MissingArtefactError(f"{key!r} is not in {self.url}") from None
            raise StoreError(
                f"could not copy {key!r} from {self.url} to {dest}: {err.strerror or err}; {_write_advice(err)}"
            ) from err

    def _read_failed(self, key: str, err: OSError) -> ArtefactError | StoreError:
        if _is_not_found(err):
            return MissingArtefactError(f"{key!r} is not in {self.url}")
        return StoreError(f"could not read {key!r} from {self.url}: {err.strerror or err}")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except OSError as err:
            raise self._read_failed(key, err) from None

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        start = self.root / prefix.rpartition("/")[0]  # the deepest folder that can hold matches
        if not start.is_dir():
            return []
        found: list[str] = []
        for folder, subfolders, files in os.walk(start):
            rel = Path(folder).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            subfolders[:] = [d for d in subfolders if _may_hold(base + d + "/", prefix)]
            found += [base + f for f in files if not f.startswith(TEMP_PREFIX) and (base + f).startswith(prefix)]
        return sorted(found)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
            _fsync_dir(path.parent)  # durable before the caller deletes the next key (GC: manifest, then object)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return  # no object under that key: deleting is idempotent
        except OSError as err:
            raise StoreError(f"could not delete {key!r} from {self.url}: {err.strerror or err}") from err
        self._remove_empty_folders(path.parent)

    def _remove_empty_folders(self, folder: Path) -> None:
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): stop tidying
                return
            folder = folder.parent

    def check(self) -> None:
        """A cheap probe: the root is a writable folder."""
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"the store folder {self.root} is not a writable folder; fix its permissions")


def _may_hold(folder: str, prefix: str) -> bool:
    """Whether keys under ``folder`` ('a/b/') can start with ``prefix``."""
    return folder.startswith(prefix) or prefix.startswith(folder)


# -------------------------------------------------------------------------------------------- commit protocol


class Manifest(BaseModel):
    """What commits an object: its hash and size, the config that produced it, and task metadata."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    key: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    config_hash: str
    meta: dict[str, Any] = Field(default_factory=dict)
    created: float = 0.0  # Unix time of the commit


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
    return Manifest(key=key, sha256=digest, size=size, config_hash=config_hash, meta=meta or {}, created=time.time())


def _committed_or_none(store: Store, key: str) -> Manifest | None:
    try:
        return read_manifest(store, key)
    except MissingArtefactError:
        return None


def _same_or_conflict(store: Store, existing: Manifest, attempt: Manifest, overwrote: bool) -> Manifest:
    if existing.sha256 == attempt.sha256:
        log.debug("%s is already committed with the same bytes", attempt.key)
        return existing
    damage = (
        " This attempt had already overwritten the object, so readers will reject it as corrupt." if overwrote else ""
    )
    raise ArtefactError(
        f"{attempt.key!r} in {store.url} is already committed with other bytes (committed sha256 {existing.sha256}, "
        f"this attempt {attempt.sha256}): another process produced it differently.{damage} Make sure one process "
        f"drives the run, then delete {attempt.key!r} and {keys.manifest_key(attempt.key)!r} and resume."
    )


def _publish_manifest(store: Store, manifest: Manifest) -> Manifest:
    body = manifest.model_dump_json(indent=1).encode()
    if store.put_if_absent(keys.manifest_key(manifest.key), body):
        log.debug("committed %s (%d bytes, sha256 %s)", manifest.key, manifest.size, manifest.sha256[:12])
        return manifest
    return _same_or_conflict(store, read_manifest(store, manifest.key), manifest, overwrote=True)


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
        return _same_or_conflict(store, existing, attempt, overwrote=False)
    store.put_bytes(key, data)
    return _publish_manifest(store, attempt)


def commit_file(store: Store, key: str, path: Path, config_hash: str, meta: dict | None = None) -> Manifest:
    """Like ``commit_bytes`` for a local file, streamed (multi-GB copies and exports)."""
    digest, size = hash_file(Path(path))
    attempt = _new_manifest(check_key(key), digest, size, config_hash, meta)
    existing = _committed_or_none(store, key)
    if existing is not None:
        return _same_or_conflict(store, existing, attempt, overwrote=False)
    store.put_file(key, Path(path))
    return _publish_manifest(store, attempt)


def commit_json(store: Store, key: str, obj: Any, config_hash: str, meta: dict | None = None) -> Manifest:
    """Commit ``obj`` as canonical JSON (sorted keys), so equal objects commit equal bytes."""
    return commit_bytes(store, key, json.dumps(obj, indent=1, sort_keys=True).encode(), config_hash, meta)


def is_committed(store: Store, key: str) -> bool:
    return store.exists(keys.manifest_key(key))


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
    return manifest


def _corrupt(store: Store, key: str, manifest: Manifest, actual: str, size: int) -> CorruptArtefactError:
    return CorruptArtefactError(
        f"artefact {key!r} in {store.url} is corrupt: sha256 {actual} ({size} bytes) but its manifest says "
        f"{manifest.sha256} ({manifest.size} bytes); delete {key!r} and {keys.manifest_key(key)!r}, then resume "
        "the run to recompute it"
    )


def _object_missing(store: Store, key: str) -> MissingArtefactError:
    return MissingArtefactError(
        f"artefact {key!r} has a manifest but no object in {store.url}; delete {keys.manifest_key(key)!r} and "
        "resume the run to recompute it"
    )


def read_verified(store: Store, key: str) -> bytes:
    """The committed bytes of ``key``, checked against its manifest's sha256.

    Raises:
        MissingArtefactError: no manifest, or a manifest without its object.
        CorruptArtefactError: the bytes do not match the manifest (the message names both hashes).
    """
    manifest = read_manifest(store, key)
    try:
        data = store.get_bytes(key)
    except MissingArtefactError:
        raise _object_missing(store, key) from None
    actual = sha256_bytes(data)
    if actual != manifest.sha256:
        raise _corrupt(store, key, manifest, actual, len(data))
    return data


def read_json(store: Store, key: str) -> Any:
    """A committed JSON artefact, verified, parsed."""
    data = read_verified(store, key)
    try:
        return json.loads(data)
    except ValueError as err:
        raise ArtefactError(f"artefact {key!r} in {store.url} is not JSON ({err}); it was committed that way") from None


def fetch_verified(store: Store, key: str, path: Path) -> Path:
    """Download a committed object to ``path`` and verify its sha256 before it appears there.

    The download goes to a temp file beside ``path`` and is renamed into place only once verified, so ``path``
    never holds bad bytes; a bad download is deleted.

    Raises:
        MissingArtefactError, CorruptArtefactError: as ``read_verified``.
    """
    manifest, path = read_manifest(store, key), Path(path)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(6)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(key, tmp)
        actual, size = hash_file(tmp)
        if actual != manifest.sha256:
            raise _corrupt(store, key, manifest, actual, size)
        os.replace(tmp, path)
    except MissingArtefactError:
        raise _object_missing(store, key) from None
    except OSError as err:
        raise StoreError(f"could not save {key!r} to {path}: {err.strerror or err}; {_write_advice(err)}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def uncommit(store: Store, key: str) -> None:
    """Remove a committed artefact: manifest first, so a crash never leaves a manifest without its object."""
    store.delete(keys.manifest_key(key))
    store.delete(key)


# ------------------------------------------------------------------------------------------ garbage collection


@dataclass(frozen=True)
class GcReport:
    """What one ``collect_garbage`` call removed. ``keys_deleted`` counts objects and manifests."""

    bytes_freed: int = 0
    keys_deleted: int = 0
    iterations: tuple[int, ...] = ()


def collect_garbage(store: Store, current_iteration: int, keep_last: int = 1) -> GcReport:
    """Delete the stats and supernets of iterations ``K <= current_iteration - keep_last``.

    Runs only once ``current_iteration``'s result is committed; search states, plans and results are kept.
    Each manifest goes before its object, so a crash mid-GC never leaves a manifest without its object, and
    calling it again finishes the job. Only keys under the store's own root or prefix are listed or deleted.

    Raises:
        ConfigError: ``keep_last`` is negative.
    """
    if keep_last < 0:
        raise ConfigError(f"keep_last must be >= 0 (iterations to keep), got {keep_last}")
    if not is_committed(store, keys.result_key(current_iteration)):
        log.info("GC skipped: the result of iteration %d is not committed yet", current_iteration)
        return GcReport()
    freed = deleted = 0
    collected = tuple(range(1, current_iteration - keep_last + 1))
    for iteration in collected:
        for prefix in (keys.stats_prefix(iteration), keys.supernet_prefix(iteration)):
            f, d = _delete_prefix(store, prefix)
            freed, deleted = freed + f, deleted + d
    log.info("GC of iterations %s: %d keys, %d bytes freed", list(collected), deleted, freed)
    return GcReport(bytes_freed=freed, keys_deleted=deleted, iterations=collected)


def _delete_prefix(store: Store, prefix: str) -> tuple[int, int]:
    """Delete every key under ``prefix``, each manifest before its object; returns (bytes freed, keys deleted)."""
    listed = store.list(prefix)
    present = set(listed)
    freed = deleted = 0
    for key in listed:
        if keys.is_manifest(key):
            continue
        freed += _size_or_zero(store, key)
        if keys.manifest_key(key) in present:
            store.delete(keys.manifest_key(key))
            deleted += 1
        store.delete(key)
        deleted += 1
    for key in listed:  # manifests whose object was removed by someone else: stale, and under a GC'd prefix
        if keys.is_manifest(key) and keys.manifest_target(key) not in present:
            store.delete(key)
            deleted += 1
    return freed, deleted


def _size_or_zero(store: Store, key: str) -> int:
    try:
        return store.size(key)
    except MissingArtefactError:  # deleted since the listing (another GC): nothing to free
        return 0
