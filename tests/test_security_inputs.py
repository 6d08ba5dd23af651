"""Inputs that name places: a run id cannot smuggle a newline into a run's folder, and a file store never follows a
symbolic link at ``runs/`` or ``runs/<id>`` (its writes and GC would land outside the store)."""

from __future__ import annotations

import re

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


def _hostile_copies(tmp_path):
    """Copies whose bytes safetensors refuses: a header length of 2**62, and a shape whose size overflows."""
    import json
    import struct

    huge = tmp_path / "huge-header.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    header = json.dumps(
        {
            "weight": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 16]},
            "kept": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]},
        }
    ).encode()
    overflow = tmp_path / "overflow.safetensors"
    overflow.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 24)
    return [huge, overflow]


def test_malformed_safetensors_are_a_corrupt_artefact_that_no_task_retries(tmp_path):
    from prefect.states import Failed

    from tasks.policies import _transient
    from tyr_core import keys
    from tyr_core.errors import CorruptArtefactError
    from tyr_core.store import commit_bytes
    from tyr_core.supernet import load_copy
    from tyr_runtime.workspace import RunRef, Workspace

    for path in _hostile_copies(tmp_path):
        with pytest.raises(CorruptArtefactError, match="not a readable safetensors file") as err:
            load_copy(path, what="supernet copy 'iter-1/supernet/x'")
        assert "iter-1/supernet/x" in str(err.value) and "manifest" in str(err.value)
        assert _transient(None, None, Failed(data=err.value)) is False  # fails at once, not after 2 + 10 + 30 s

    from flows.recipes import resolve_config

    ref = RunRef(run_id="w1", store_url=f"file://{tmp_path / 'store'}")
    ws = Workspace(ref, run_store(ref.store_url, ref.run_id), resolve_config("tiny-test"), tmp_path / "cache")
    commit_bytes(ws.store, keys.calibration_key(), _hostile_copies(tmp_path)[0].read_bytes(), "cfg")
    with pytest.raises(CorruptArtefactError, match="calibration windows 'calibration/tokens.safetensors'"):
        ws.calibration()


def test_a_stored_copy_whose_kept_indices_do_not_fit_its_sublayer_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from flows.recipes import resolve_config
    from tyr_core import keys
    from tyr_core.errors import CorruptArtefactError
    from tyr_core.grid import Sublayer
    from tyr_core.store import commit_bytes
    from tyr_core.sublayer_layout import PrunedSublayer
    from tyr_core.supernet import SupernetReader, copy_bytes, load_copy, sha256_file
    from tyr_runtime.workspace import RunRef, Workspace

    def copy(kept: list[int], columns_per_group: int = 16):
        path = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}.safetensors"
        kept_t = torch.tensor(kept, dtype=torch.int64)
        save_file({"weight": torch.ones(8, len(kept) * columns_per_group), "kept": kept_t}, str(path))
        return path

    assert load_copy(copy([0, 2]), groups=4, num_kept=2).kept.tolist() == [0, 2]
    refused = {
        "negative": (copy([-1]), 4, 1),
        "repeated": (copy([1, 1]), 4, 2),
        "out of order": (copy([2, 0]), 4, 2),
        "keeps group 4 of a sublayer with 4 groups": (copy([0, 4]), 4, 2),
        "keeps 2 groups where its level keeps 3": (copy([0, 1]), 4, 3),
        "17 columns for 2 kept groups": (_ragged(tmp_path), 4, 2),
    }
    for problem, (path, groups, num_kept) in refused.items():
        with pytest.raises(CorruptArtefactError, match=problem):
            load_copy(path, groups, num_kept)

    # the search reads copies through the supernet index, which knows each sublayer's groups
    bad = copy([0, 5])
    sub = {"layer": 0, "kind": "attn", "groups": 4, "centre": 2, "step": 1, "lo": 0, "hi": 0}
    entry = {"layer": 0, "kind": "attn", "level": 0, "key": bad.name, "sha256": sha256_file(bad)}
    index = {"sublayers": [sub], "copies": [{**entry, "groups_total": 4, "groups_kept": 2}]}
    with pytest.raises(CorruptArtefactError, match=f"supernet copy '{bad.name}'.*keeps group 5"):
        SupernetReader(tmp_path, index=index).load(0, "attn", 0)

    # a resumed build replays a layer from the store's copies
    ref = RunRef(run_id="w1", store_url=f"file://{tmp_path / 'store'}")
    ws = Workspace(ref, run_store(ref.store_url, ref.run_id), resolve_config("tiny-test"), tmp_path / "cache")
    sublayer = Sublayer(layer=0, kind="mlp", groups=8, centre=4, step=1, lo=0, hi=0)
    key = keys.copy_key(1, 0, "mlp", 0)
    hostile = PrunedSublayer(kept=torch.tensor([0, 1, 2, 9]), weight=torch.ones(4, 4))
    commit_bytes(ws.store, key, copy_bytes(hostile), "cfg")
    refusal = rf"supernet copy '{re.escape(key)}'.*keeps group 9 of a sublayer with 8"
    with pytest.raises(CorruptArtefactError, match=refusal):
        ws.copies(1, [sublayer], 0)


def _ragged(tmp_path):
    """A copy of 2 kept heads whose weight has 17 columns: not a whole number per head."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "ragged.safetensors"
    save_file({"weight": torch.ones(8, 17), "kept": torch.tensor([0, 1], dtype=torch.int64)}, str(path))
    return path
