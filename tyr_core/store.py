"""Artefact stores and the commit protocol.

A ``Store`` maps relative keys ('/'-separated, inside one run's prefix) to bytes. Committing writes the object,
then a manifest (sha256, size, producing config hash) with a conditional create; readers trust manifests only
and verify hashes. ``FileStore`` backs ``file://`` URLs; the S3 store lives in ``tasks/storage.py``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from . import artifacts as keys
from .errors import ArtefactError, CorruptArtefactError, MissingArtefactError, StoreError

log = logging.getLogger(__name__)


class Store(Protocol):
    url: str  # safe to log: never holds credentials

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_if_absent(self, key: str, data: bytes) -> bool: ...
    def get_bytes(self, key: str) -> bytes: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...


def check_key(key: str) -> str:
    """Reject keys that could address anything outside the store's root or prefix."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid artefact key {key!r}: keys are relative, '/'-separated, without '.' or '..'")
    return key


class FileStore:
    """A store in a local folder: atomic writes (temp file + rename), conditional create with a hard link."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create the store folder {self.root}: {err.strerror}") from err

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_temp(self, key: str, data: bytes | None = None, src: Path | None = None) -> Path:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                if src is None:
                    f.write(data or b"")
                else:
                    with open(src, "rb") as s:
                        while chunk := s.read(1 << 22):
                            f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            Path(tmp).unlink(missing_ok=True)
            hint = "the disk is full: free space or point the store elsewhere" if err.errno == errno.ENOSPC else ""
            raise StoreError(f"could not write {key!r} to {self.url}: {err.strerror}. {hint}".strip()) from err
        return Path(tmp)

    def put_bytes(self, key: str, data: bytes) -> None:
        os.replace(self._write_temp(key, data), self._path(key))

    def put_file(self, key: str, path: Path) -> None:
        os.replace(self._write_temp(key, src=Path(path)), self._path(key))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        tmp = self._write_temp(key, data)
        try:
            os.link(tmp, self._path(key))  # atomic: fails if the key exists
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise MissingArtefactError(f"{key!r} is not in {self.url}") from None

    def get_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise MissingArtefactError(f"{key!r} is not in {self.url}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_name(Path(path).name + ".part")
        with open(src, "rb") as s, open(tmp, "wb") as d:
            while chunk := s.read(1 << 22):
                d.write(chunk)
        os.replace(tmp, path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise MissingArtefactError(f"{key!r} is not in {self.url}") from None

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if prefix and not prefix.endswith("/") and not base.is_dir():
            base = base.parent
        if not base.exists():
            return []
        out = []
        for p in base.rglob("*"):
            rel = p.relative_to(self.root).as_posix()
            if p.is_file() and rel.startswith(prefix) and not p.name.startswith(".tmp-"):
                out.append(rel)
        return sorted(out)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        for parent in path.parents:  # tidy empty folders, never above the root
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:
                break


class Manifest(BaseModel):
    """What commits an object: its hash and size, the config that produced it, and task metadata."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    key: str
    sha256: str
    size: int
    config_hash: str
    meta: dict[str, Any] = {}
    created: float = 0.0


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _commit_manifest(store: Store, manifest: Manifest) -> Manifest:
    body = manifest.model_dump_json(indent=1).encode()
    if store.put_if_absent(keys.manifest_key(manifest.key), body):
        return manifest
    existing = read_manifest(store, manifest.key)
    if existing.sha256 != manifest.sha256:
        raise ArtefactError(
            f"{manifest.key!r} is already committed with other bytes (sha256 {existing.sha256[:12]}, now "
            f"{manifest.sha256[:12]}); another process produced it differently. Check the run's config."
        )
    return existing


def commit_bytes(store: Store, key: str, data: bytes, config_hash: str, meta: dict | None = None) -> Manifest:
    """Write ``data`` at ``key``, then commit it with a manifest; idempotent for the same bytes."""
    digest = sha256_bytes(data)
    if is_committed(store, key):
        return _commit_manifest(store, Manifest(key=key, sha256=digest, size=len(data), config_hash=config_hash))
    store.put_bytes(key, data)
    manifest = Manifest(
        key=key, sha256=digest, size=len(data), config_hash=config_hash, meta=meta or {}, created=time.time()
    )
    return _commit_manifest(store, manifest)


def commit_file(store: Store, key: str, path: Path, config_hash: str, meta: dict | None = None) -> Manifest:
    """Like ``commit_bytes`` for a local file, streamed (multi-GB copies and exports)."""
    digest, size = sha256_path(Path(path)), Path(path).stat().st_size
    if not is_committed(store, key):
        store.put_file(key, Path(path))
    manifest = Manifest(
        key=key, sha256=digest, size=size, config_hash=config_hash, meta=meta or {}, created=time.time()
    )
    return _commit_manifest(store, manifest)


def commit_json(store: Store, key: str, obj: Any, config_hash: str) -> Manifest:
    return commit_bytes(store, key, json.dumps(obj, indent=1, sort_keys=True).encode(), config_hash)


def is_committed(store: Store, key: str) -> bool:
    return store.exists(keys.manifest_key(key))


def read_manifest(store: Store, key: str) -> Manifest:
    try:
        return Manifest.model_validate_json(store.get_bytes(keys.manifest_key(key)))
    except MissingArtefactError:
        raise MissingArtefactError(f"artefact {key!r} is not committed in {store.url}") from None


def read_verified(store: Store, key: str) -> bytes:
    """The committed bytes of ``key``, checked against its manifest."""
    manifest = read_manifest(store, key)
    try:
        data = store.get_bytes(key)
    except MissingArtefactError:
        raise MissingArtefactError(f"artefact {key!r} has a manifest but no object in {store.url}") from None
    if sha256_bytes(data) != manifest.sha256:
        raise CorruptArtefactError(
            f"artefact {key!r} in {store.url} is corrupt: sha256 {sha256_bytes(data)[:12]} != committed "
            f"{manifest.sha256[:12]}; delete it and its manifest, then resume to recompute it"
        )
    return data


def read_json(store: Store, key: str) -> Any:
    return json.loads(read_verified(store, key))


def fetch_verified(store: Store, key: str, path: Path) -> Path:
    """Download a committed object to ``path`` and verify it; a bad download is deleted."""
    manifest = read_manifest(store, key)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    store.get_file(key, path)
    actual = sha256_path(path)
    if actual != manifest.sha256:
        path.unlink(missing_ok=True)
        raise CorruptArtefactError(
            f"artefact {key!r} in {store.url} is corrupt: sha256 {actual[:12]} != committed {manifest.sha256[:12]}; "
            "delete it and its manifest, then resume to recompute it"
        )
    return path


def uncommit(store: Store, key: str) -> None:
    """Remove a committed artefact: manifest first, so a crash never leaves a manifest without its object."""
    store.delete(keys.manifest_key(key))
    store.delete(key)


@dataclass
class GcReport:
    bytes_freed: int = 0
    keys_deleted: int = 0
    iterations: list[int] = field(default_factory=list)


def collect_garbage(store: Store, current_iteration: int, keep_last: int = 1) -> GcReport:
    """Delete the stats and supernets of iterations ``<= current - keep_last`` once ``current``'s result is
    committed. Search states and results are kept. Resumable; never leaves the store's own prefix."""
    report = GcReport()
    if not is_committed(store, keys.result_key(current_iteration)):
        return report
    for iteration in range(1, current_iteration - keep_last + 1):
        for prefix in (keys.stats_prefix(iteration), keys.supernet_prefix(iteration)):
            for key in store.list(prefix):
                if keys.is_manifest(key):
                    continue
                report.bytes_freed += store.size(key)
                uncommit(store, key)
                report.keys_deleted += 1
            for key in store.list(prefix):  # manifests whose object was already gone (interrupted GC)
                store.delete(key)
        report.iterations.append(iteration)
    return report
