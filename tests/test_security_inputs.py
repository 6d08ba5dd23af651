"""Inputs that name places: a run id cannot smuggle a newline into a run's folder, and a file store never follows a
symbolic link at ``runs/`` or ``runs/<id>`` (its writes and GC would land outside the store)."""

from __future__ import annotations

import pytest

from tyr_core.errors import ConfigError, StoreError
from tyr_core.store import FileStore
from tyr_runtime.storage import check_run_id, run_store


@pytest.mark.parametrize("run_id", ["r1\n", "r1\r", "r1\n\n", "\nr1", "r1 ", "r1/x", "..", ".r1", "", "a" * 129])
def test_run_ids_are_refused_unless_the_whole_string_is_a_name(run_id, tmp_path):
    with pytest.raises(ConfigError, match="invalid run id"):
        check_run_id(run_id)
    with pytest.raises(ConfigError, match="invalid run id"):
        run_store(f"file://{tmp_path / 'store'}", run_id)
    assert not (tmp_path / "store" / "runs").exists() or list((tmp_path / "store" / "runs").iterdir()) == []


def test_plain_run_ids_still_pass():
    for run_id in ("r1", "smollm2-135m-0123456789", "a.b_c-d", "a" * 128):
        assert check_run_id(run_id) == run_id


@pytest.mark.parametrize("link_at", ["runs/r1", "runs"])
def test_a_run_folder_that_is_a_symbolic_link_is_refused_and_nothing_outside_is_touched(tmp_path, link_at):
    outside = tmp_path / "outside"
    (outside / "r1" if link_at == "runs" else outside).mkdir(parents=True)
    victim = (outside / "r1" if link_at == "runs" else outside) / "victim.txt"
    victim.write_text("not the store's")
    root = tmp_path / "store"
    (root / "runs").mkdir(parents=True, exist_ok=True) if link_at == "runs/r1" else root.mkdir()
    (root / link_at).symlink_to(outside if link_at == "runs" else outside, target_is_directory=True)
    with pytest.raises(StoreError, match="symbolic link"):
        run_store(f"file://{root}", "r1")
    with pytest.raises(StoreError, match="symbolic link"):
        FileStore(root).scoped("runs/r1")
    assert victim.read_text() == "not the store's" and sorted(p.name for p in victim.parent.iterdir()) == ["victim.txt"]


def test_a_real_run_folder_is_scoped_as_before(tmp_path):
    store = run_store(f"file://{tmp_path / 'store'}", "r1")
    store.put_bytes("a/b.json", b"{}")
    assert (tmp_path / "store" / "runs" / "r1" / "a" / "b.json").read_bytes() == b"{}"
