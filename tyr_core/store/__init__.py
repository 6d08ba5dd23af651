"""Artefact stores, the commit protocol and garbage collection.

A ``Store`` maps relative keys ('/'-separated, inside one run's prefix) to bytes (``protocol.py``). Committing
writes the object, then a manifest with a conditional create; readers trust manifests only and verify hashes
(``commit.py``). ``FileStore`` backs ``file://`` URLs (``filestore.py``); the S3 store lives in
``tyr_runtime/s3.py``. ``gc.py`` deletes earlier iterations' stats and supernets.
"""

from .commit import (
    Manifest,
    canonical_json,
    commit_bytes,
    commit_file,
    commit_json,
    commit_json_once,
    commit_once,
    fetch_verified,
    hash_file,
    is_committed,
    private_dir,
    read_json,
    read_manifest,
    read_verified,
    remaining,
    sha256_bytes,
    sha256_path,
    uncommit,
)
from .filestore import FileStore
from .gc import GcReport, best_iteration, collect_garbage
from .protocol import CHUNK_BYTES, TEMP_PREFIX, Store, check_key, check_prefix

__all__ = [
    "CHUNK_BYTES",
    "TEMP_PREFIX",
    "FileStore",
    "GcReport",
    "Manifest",
    "Store",
    "best_iteration",
    "canonical_json",
    "check_key",
    "check_prefix",
    "collect_garbage",
    "commit_bytes",
    "commit_file",
    "commit_json",
    "commit_json_once",
    "commit_once",
    "fetch_verified",
    "hash_file",
    "is_committed",
    "private_dir",
    "read_json",
    "read_manifest",
    "read_verified",
    "remaining",
    "sha256_bytes",
    "sha256_path",
    "uncommit",
]
