"""Scratch folders for the bench scripts, removed when the script exits.

A SmolLM2 bench writes gigabytes (supernets, teacher top-k, stores, a PostgreSQL cluster); left in /tmp, a few
runs fill a small disk, and SeaweedFS turns read-only under 1% free. Set TYR_BENCH_KEEP=1 to keep them for
inspection.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    """A fresh folder under the system temp dir, deleted (with everything in it) at interpreter exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("TYR_BENCH_KEEP") != "1":
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
