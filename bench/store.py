"""Store throughput, sha256 work included: copy-sized objects through commit_bytes/read_verified and large files
through commit_file/fetch_verified, to a real SeaweedFS (embedded, in a temp folder) and, for reference, to a
FileStore on the same disk. Raw put/get lines show what the commit protocol (hash + manifest) costs.

Prints one JSON object per line. Usage: python bench/store.py [--objects 50] [--object-mb 2] [--files 3]
[--file-mb 20] [--backends seaweedfs file]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tyr_core import keys  # noqa: E402
from tyr_core.store import FileStore, Store, commit_bytes, commit_file, fetch_verified, read_verified  # noqa: E402
from tyr_runtime.seaweed import EmbeddedSeaweed  # noqa: E402

MB = 1 << 20


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def timed(work: Callable[[], None]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def report(backend: str, op: str, count: int, total_bytes: int, seconds: float) -> None:
    emit(
        bench="store",
        backend=backend,
        op=op,
        count=count,
        mb=round(total_bytes / MB, 1),
        seconds=round(seconds, 3),
        mb_per_s=round(total_bytes / MB / seconds, 1),
    )


def bench_objects(store: Store, backend: str, count: int, size: int) -> None:
    """``count`` copy-sized objects: raw put/get, then the commit protocol (sha256 + manifest, verified read)."""
    payloads = {keys.copy_key(1, i, "mlp", 0): os.urandom(size) for i in range(count)}
    raw = {keys.stats_key(1, i): data for i, data in enumerate(payloads.values())}
    total = count * size
    report(backend, "put_bytes (raw)", count, total, timed(lambda: [store.put_bytes(k, d) for k, d in raw.items()]))
    report(backend, "get_bytes (raw)", count, total, timed(lambda: [store.get_bytes(k) for k in raw]))
    commit = timed(lambda: [commit_bytes(store, k, d, "bench") for k, d in payloads.items()])
    report(backend, "commit_bytes", count, total, commit)
    read = timed(lambda: [read_verified(store, k) for k in payloads])
    report(backend, "read_verified", count, total, read)


def bench_files(store: Store, backend: str, count: int, size: int, scratch: Path) -> None:
    """``count`` large files: commit_file (hash, then streamed/multipart upload) and fetch_verified."""
    files = {}
    for i in range(count):
        path = scratch / f"file-{i}.safetensors"
        with open(path, "wb") as f:
            for _ in range(size // MB):
                f.write(os.urandom(MB))
        files[keys.final_key(f"bench/file-{i}.safetensors")] = path
    total = count * size
    report(
        backend,
        "commit_file",
        count,
        total,
        timed(lambda: [commit_file(store, k, p, "bench") for k, p in files.items()]),
    )
    out = scratch / "fetched"
    fetch = timed(lambda: [fetch_verified(store, k, out / Path(k).name) for k in files])
    report(backend, "fetch_verified", count, total, fetch)


def bench_sha256(total: int) -> None:
    data = os.urandom(64 * MB)
    seconds = timed(lambda: [hashlib.sha256(data).digest() for _ in range(max(1, total // len(data)))])
    report("cpu", "sha256 alone", max(1, total // len(data)), max(1, total // len(data)) * len(data), seconds)


def run_backend(backend: str, args: argparse.Namespace, scratch: Path) -> None:
    if backend == "seaweedfs":
        started = time.perf_counter()
        with EmbeddedSeaweed(scratch / "seaweedfs") as server:
            emit(bench="store", backend=backend, op="start", seconds=round(time.perf_counter() - started, 2))
            store = server.open_store("bench")
            bench_objects(store, backend, args.objects, int(args.object_mb * MB))
            bench_files(store, backend, args.files, int(args.file_mb * MB), scratch)
    else:
        store = FileStore(scratch / "filestore")
        bench_objects(store, backend, args.objects, int(args.object_mb * MB))
        bench_files(store, backend, args.files, int(args.file_mb * MB), scratch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=50)
    parser.add_argument("--object-mb", type=float, default=2)
    parser.add_argument("--files", type=int, default=3)
    parser.add_argument("--file-mb", type=float, default=20)
    parser.add_argument("--backends", nargs="+", default=["seaweedfs", "file"], choices=["seaweedfs", "file"])
    args = parser.parse_args()
    bench_sha256(int(args.objects * args.object_mb * MB))
    for backend in args.backends:
        with tempfile.TemporaryDirectory(prefix="tyr-bench-store-") as scratch:
            run_backend(backend, args, Path(scratch))


if __name__ == "__main__":
    main()
