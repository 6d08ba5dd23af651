"""A supernet build spread over several devices (here several CPU "devices", each with its own block copy and
thread) gives the same bits as on one: Hessians are summed from per-chunk partials in chunk order, the activations
of each chunk are computed alike wherever they live, and each prune's numerics do not depend on its device."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tyr_core.grid import build_sublayers
from tyr_core.layerwise import Activations, LayerwiseModel, ShardedActivations, embed_windows
from tyr_core.supernet import stored_tensors
from tyr_core.supernet_build import LayerCursor, PruneSettings, SupernetBuild, build_supernet, layer_stats

CENTRES = {"attn": [2, 2], "mlp": [64, 64]}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread in every thread: on a loaded host an OpenMP team waits at each barrier, which made these
    builds ten times as long. The bits compared are those of one setting either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _grid():
    return build_sublayers({"attn": 4, "mlp": 128}, 2, CENTRES, 0.25, 5)


def _settings(count: int, **kw) -> PruneSettings:
    # 24 windows in chunks of 5: five chunks, the last one short, dealt unevenly over 2 and 3 devices
    return PruneSettings(batch_size=5, mlp_rounds=4, devices=(CPU,) * count, **kw)


def _walk(folder, windows, settings: PruneSettings) -> tuple[list[dict], LayerCursor]:
    """Every layer as a build does it; per layer: its H (and C), its copies' stored tensors, the next inputs."""
    subs = _grid()
    cursor = LayerCursor(LayerwiseModel(folder), windows, settings, subs)
    seen = []
    for layer in range(cursor.model.num_layers):
        hessians = {k: h.clone() for k, h in cursor.hessians().items()}
        cross = None if cursor._cross is None else {k: c.clone() for k, c in cursor._cross.items()}
        requests = [(s, lv) for s in subs if s.layer == layer for lv in s.levels]
        pruned = cursor.prune_all(requests)
        copies: dict = {}
        for (sub, level), c in zip(requests, pruned, strict=True):
            copies.setdefault(sub.kind, {})[level] = c
        cursor.advance(subs, copies)
        seen.append(
            {
                "h": hessians,
                "c": cross,
                "copies": {(s.kind, lv): stored_tensors(c) for (s, lv), c in zip(requests, pruned, strict=True)},
                "next": cursor.inputs.data.clone(),
            }
        )
    return seen, cursor


def _assert_same_bits(a: list[dict], b: list[dict]) -> None:
    for one, other in zip(a, b, strict=True):
        for kind, h in one["h"].items():
            assert torch.equal(h, other["h"][kind]), f"H of {kind} differs"
        if one["c"] is not None:
            for kind, c in one["c"].items():
                assert torch.equal(c, other["c"][kind]), f"C of {kind} differs"
        assert one["copies"].keys() == other["copies"].keys()
        for key, tensors in one["copies"].items():
            for name, t in tensors.items():
                assert torch.equal(t, other["copies"][key][name]), f"copy {key} {name} differs"
        assert torch.equal(one["next"], other["next"]), "next layer's activations differ"


@pytest.mark.parametrize(
    ("family", "extra"),
    [("llama", {}), ("qwen2", {}), ("llama", {"refit_target": "dense"})],
    ids=["llama", "qwen2", "llama-dense-refit"],
)
def test_one_two_and_three_devices_give_the_same_bits(family, extra, tiny_folder, windows):
    one, _ = _walk(tiny_folder(family), windows, _settings(1, accumulation="expectation", **extra))
    for count in (2, 3):
        many, cursor = _walk(tiny_folder(family), windows, _settings(count, accumulation="expectation", **extra))
        _assert_same_bits(one, many)
        assert len(cursor.inputs.parts) == count
        if extra:
            assert one[0]["c"] is not None  # the paired (pruned, dense) statistics were compared too


def test_the_prunes_of_a_layer_run_on_every_device_in_threads_of_their_own(tiny_folder, windows):
    subs = _grid()
    cursor = LayerCursor(LayerwiseModel(tiny_folder("llama")), windows, _settings(3), subs)
    requests = [(s, lv) for s in subs if s.layer == 0 for lv in s.levels]
    pruned = cursor.prune_all(requests)
    devices = {k for _, _, k, _ in cursor.prune_log}
    threads = {t for _, _, _, t in cursor.prune_log}
    assert len(cursor.prune_log) == len(requests) == 10
    assert devices == {0, 1, 2} and len(threads) == 3
    # the local-prune step asks again, one copy at a time: the spread copies are handed out, not recomputed
    assert all(cursor.prune(s, lv) is c for (s, lv), c in zip(requests, pruned, strict=True))
    assert len(cursor.prune_log) == len(requests)


def test_a_built_supernet_is_byte_identical_on_one_and_three_devices(tiny_folder, windows, tmp_path):
    folder, subs = tiny_folder("qwen2"), _grid()
    indexes = [
        build_supernet(SupernetBuild(LayerwiseModel(folder), windows, subs, _settings(n), tmp_path / str(n)))
        for n in (1, 3)
    ]
    digests = [[(e["key"], e["sha256"]) for e in index["copies"]] for index in indexes]
    assert digests[0] == digests[1]


def test_chunks_are_dealt_in_turn_and_layer_stats_sums_them_in_order(tiny_folder, windows):
    lm = LayerwiseModel(tiny_folder("llama"))
    whole = Activations((24, 32, 64), torch.float32, 1 << 30, None)
    dealt = ShardedActivations((24, 32, 64), torch.float32, 5, [CPU, CPU])
    embed_windows(lm, windows, whole, 5)
    embed_windows(lm, windows, dealt, 5)
    assert dealt.owned == [[0, 2, 4], [1, 3]] and [p.shape[0] for p in dealt.parts] == [14, 10]
    assert torch.equal(dealt.data, whole.data)
    pos = lm.position_embeddings(32)
    block = lm.block(0)
    got = layer_stats(block, whole, pos, 5)["mlp"]
    want = None
    captured = []
    handle = block.mlp.down_proj.register_forward_pre_hook(lambda _m, a: captured.append(a[0].reshape(-1, 128)))
    with torch.inference_mode():
        for start in range(0, 24, 5):
            block(whole.data[start : start + 5], attention_mask=None, position_embeddings=pos)
    handle.remove()
    for x in captured:
        part = x.t() @ x
        want = part.clone() if want is None else want + part
    assert torch.equal(got, want)


def _worker_run(tmp_path, name: str, devices: list[torch.device], monkeypatch):
    """A tiny-test run's workspace with its calibration and iteration 1's plan committed, building on ``devices``."""
    from flows.recipes import resolve_config
    from tyr_core import keys
    from tyr_core.pipeline import initial_centres, plan_iteration
    from tyr_core.store import commit_bytes, commit_file
    from tyr_runtime import workspace as workspace_module
    from tyr_runtime.storage import run_store
    from tyr_runtime.workspace import RunRef, Workspace, dumps

    ref = RunRef(run_id=name, store_url=f"file://{tmp_path / name / 'store'}")
    ws = Workspace(ref, run_store(ref.store_url, ref.run_id), resolve_config("tiny-test"), tmp_path / name / "cache")
    monkeypatch.setattr(ws, "build_devices", lambda: list(devices))
    monkeypatch.setitem(workspace_module._WORKSPACES, ref, ws)
    calibration = tmp_path / name / "calibration.safetensors"
    calibration.parent.mkdir(parents=True, exist_ok=True)
    save_file({"windows": torch.randint(0, 100, (6, 64), generator=torch.Generator().manual_seed(0))}, calibration)
    commit_file(ws.store, keys.calibration_key(), calibration, "cfg")
    geo = ws.model.geometry
    subs = plan_iteration(geo, ws.config.prune, 1, initial_centres(geo, ws.config.prune))
    commit_bytes(ws.store, keys.plan_key(1), dumps({"iteration": 1, "sublayers": [vars(s) for s in subs]}), "cfg")
    return ref, ws, subs


def _build_steps(ref, subs, layers: range) -> list[dict]:
    """The flow's build steps for ``layers`` of iteration 1 (what a Ray build actor is sent); their index entries."""
    from tyr_runtime import worker_steps

    last = max(s.layer for s in subs)
    entries = []
    for layer in layers:
        worker_steps.layer_stats(ref, 1, layer)
        for level in sorted({lv for s in subs if s.layer == layer for lv in s.levels}):
            kinds = [s.kind for s in subs if s.layer == layer and level in s.levels]
            entries += worker_steps.local_prune(ref, 1, layer, level, kinds)
        if layer < last:
            worker_steps.accumulate(ref, 1, layer)
    return entries


def _worker_build(tmp_path, name: str, devices: list[torch.device], monkeypatch) -> tuple[dict, list]:
    """Iteration 1's build through the worker steps (what a Ray build actor runs), on ``devices``."""
    from tyr_runtime import worker_steps

    ref, ws, subs = _worker_run(tmp_path, name, devices, monkeypatch)
    entries = _build_steps(ref, subs, range(ws.model.geometry.num_layers))
    log = list(ws.cursor(1, subs).prune_log)
    worker_steps.end_build(ref)
    return {e["key"]: e["sha256"] for e in entries}, log


def test_the_worker_steps_spread_a_layer_over_the_build_devices(tmp_path, monkeypatch):
    one, _ = _worker_build(tmp_path, "one", [CPU], monkeypatch)
    two, log = _worker_build(tmp_path, "two", [CPU, CPU], monkeypatch)
    assert one == two  # every committed copy has the same sha256
    assert {k for _, _, k, _ in log} == {0, 1}  # layer_stats spread each layer's prunes over both devices
    assert len(log) == len(two)  # local_prune committed them, computing none of them again


def test_a_build_process_driven_again_from_layer_0_computes_and_commits_nothing_twice(tmp_path, monkeypatch):
    """A Ray build actor outlives the flow run that drove it: a Retry sends it the steps from layer 0 again, while its
    cursor is past them. Those steps return the committed copies, and the layer left unfinished is built once."""
    from tyr_runtime import worker_steps

    one, _ = _worker_build(tmp_path, "one", [CPU], monkeypatch)
    ref, ws, subs = _worker_run(tmp_path, "again", [CPU], monkeypatch)
    layers = ws.model.geometry.num_layers
    start = len(worker_steps.COMMITTED_HERE)
    first = _build_steps(ref, subs, range(layers - 1))  # killed before the last layer; the cursor is at it
    cursor = ws.cursor(1, subs)
    assert cursor.layer == layers - 1
    computed = len(cursor.prune_log)
    again = _build_steps(ref, subs, range(layers))  # the Retry
    assert ws.cursor(1, subs) is cursor and len(cursor.prune_log) > computed  # went on from where it was
    assert sorted(worker_steps.COMMITTED_HERE[start:]) == sorted(one)  # each copy computed and committed once
    assert {e["key"]: e["sha256"] for e in again} == one  # the uninterrupted build's copies
    assert {e["key"] for e in first} < set(one)


def test_a_layer_behind_the_cursor_with_a_copy_to_build_is_rebuilt_by_a_fresh_cursor(tmp_path, monkeypatch):
    """A copy of a layer the cursor has passed is not committed (its manifest was removed): the layer is replayed
    from the committed copies before it, and the copy gets the same bits."""
    from tyr_core import keys

    one, _ = _worker_build(tmp_path, "one", [CPU], monkeypatch)
    ref, ws, subs = _worker_run(tmp_path, "again", [CPU], monkeypatch)
    layers = ws.model.geometry.num_layers
    _build_steps(ref, subs, range(layers))
    cursor = ws.cursor(1, subs)
    lost = next(k for k in one if k.startswith(keys.copy_key(1, layers - 2, "mlp", 0).rsplit("/", 1)[0]))
    ws.store.delete(keys.manifest_key(lost))
    again = _build_steps(ref, subs, range(layers))
    assert ws.cursor(1, subs) is not cursor
    assert {e["key"]: e["sha256"] for e in again} == one
