"""The ``tyr`` flow end to end on the tiny-test shorthand, in-process against the shared Prefect server, with a file
store: it completes, a second run of the same run id recomputes nothing, and a config change is refused."""

from __future__ import annotations

import shutil
import time

import pytest
from conftest import in_process_client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness(prefect_server):
    with in_process_client(prefect_server):
        yield


def _manifests(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*.manifest.json")}


def test_tiny_run_completes_resumes_without_recomputing_and_refuses_other_configs(harness, tmp_path):
    import torch

    from flows.tyr import tyr
    from tyr_core.errors import IncompatibleRunError
    from tyr_runtime.workspace import _WORKSPACES, RunRef

    url = f"file://{tmp_path}"
    threads = torch.get_num_threads()
    state = tyr(preset="tiny-test", run_id="t1", store_url=url, return_state=True)
    out = state.result()
    assert torch.get_num_threads() == 1  # the preset's torch_threads, applied by the run to its process
    torch.set_num_threads(threads)
    assert RunRef(run_id="t1", store_url=url) not in _WORKSPACES  # the ended run's models and caches were released
    from safetensors.torch import load

    from tyr_core import keys
    from tyr_core.store import FileStore, is_committed, read_json, read_verified

    run_dir = tmp_path / "runs" / "t1"
    run = FileStore(run_dir)
    result = read_json(run, keys.result_key(2))
    assert set(result["sparsities"]) and out["report"]["tyr_ppl"] > 0
    # the budget is exact: mean attention and MLP sparsity equal the target
    attn = [v for k, v in result["sparsities"].items() if k.endswith("self_attn")]
    mlp = [v for k, v in result["sparsities"].items() if k.endswith("mlp")]
    assert sum(attn) / len(attn) == pytest.approx(0.5) and sum(mlp) / len(mlp) == pytest.approx(0.5)
    # the final model is the iteration whose winner scored best on the validation windows; GC kept its supernet
    # and the last one's, nothing else
    fitness = {it: read_json(run, keys.result_key(it))["validation_fitness"] for it in (1, 2)}
    best = 1 if fitness[1] < fitness[2] else 2
    assert out["report"]["iteration"] == best
    kept = {it for it in (1, 2) if any(k.endswith(".manifest.json") for k in run.list(keys.supernet_prefix(it)))}
    assert kept == {best, 2}

    _check_artifacts("t1", out["report"]["tyr_ppl"])
    _check_heartbeats()
    _check_run_names(state.state_details.flow_run_id)

    # a copy committed by an attempt whose task result was lost is returned with the hash the index holds
    from tasks.supernet import local_prune

    index = read_json(run, keys.supernet_index_key(2))
    entry = index["copies"][-1]
    ref = RunRef(run_id="t1", store_url=url)
    assert local_prune.fn(ref, 2, entry["layer"], {entry["level"]: [entry["kind"]]}) == [entry]

    before = _manifests(run_dir)
    again = tyr(preset="tiny-test", run_id="t1", store_url=url)
    assert _manifests(run_dir) == before  # nothing committed twice
    assert again["result"] == out["result"]

    with pytest.raises(IncompatibleRunError, match="another configuration"):
        tyr(preset="tiny-test", run_id="t1", store_url=url, target_sparsity=0.25)

    # Prefect's cached results belong to one store and one incarnation of the run: the same run id in another
    # store, or the run deleted and redone, computes and commits its own artefacts (it used to come back Cached
    # with nothing committed, and the next task failed on the missing plan). This one prunes two levels at once
    # through the task runner (concurrent_prunes, outside the artefact hash), to the same result.
    other = tmp_path / "other"
    # The device is a run setting too: device=cpu gives the default run's artefacts on a machine without a GPU.
    settings = ["concurrent_prunes=2", "device=cpu"]
    elsewhere = tyr(preset="tiny-test", run_id="t1", store_url=f"file://{other}", overrides=settings)
    assert is_committed(FileStore(other / "runs" / "t1"), keys.plan_key(1)) and elsewhere["result"] == out["result"]

    # a validation split: the search scores windows that no copy was refitted on; and the fitness's hidden-state
    # term, whose dense states the teacher step commits beside the top-k
    held = tmp_path / "held"
    hidden = ["calibration.validation_windows=4", "search.hidden_weight=1.0"]
    tyr(preset="tiny-test", run_id="v1", store_url=f"file://{held}", overrides=hidden)
    v1 = FileStore(held / "runs" / "v1")
    teacher_index = read_json(v1, keys.teacher_index_key())
    assert teacher_index["hidden_layers"] == [0, 1]  # the tiny model's 2 layers: first, middle (1) and last
    shard = load(read_verified(v1, keys.teacher_file_key(teacher_index["shards"][0])))
    assert shard["hidden"].shape[:3] == (4, 2, 64) and shard["hidden"].dtype == torch.float16
    assert is_committed(v1, keys.result_key(2))
    calib = load(read_verified(v1, keys.calibration_key()))["windows"]
    validation = load(read_verified(v1, keys.calibration_key("validation")))["windows"]
    assert validation.shape == (4, 64) and torch.equal(
        calib, load(read_verified(run, keys.calibration_key()))["windows"]
    )
    assert not any(torch.equal(v, c) for v in validation for c in calib)
    assert read_json(v1, keys.teacher_index_key())["windows"] == 4
    shutil.rmtree(run_dir)
    redone = tyr(preset="tiny-test", run_id="t1", store_url=url)
    assert is_committed(run, keys.result_key(2)) and redone["result"] == out["result"]


def _check_heartbeats() -> None:
    """The run heartbeats (zombie detection can mark it Crashed); its in-process iteration subflows do not."""
    from prefect.client.orchestration import get_client

    body = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]}}, "limit": 50}
    with get_client(sync_client=True) as client:
        for _ in range(30):  # events are persisted asynchronously
            events = client.request("POST", "/events/filter", json=body).json()["events"]
            if events:
                break
            time.sleep(1)
    flows = {r["prefect.resource.name"] for e in events for r in e["related"] if r["prefect.resource.role"] == "flow"}
    assert flows == {"tyr"}


def _check_run_names(flow_run_id) -> None:
    """The UI names each run for what it does: the iteration subflows by their iteration, the per-layer tasks by
    their layer, a generation by its number, an export by its format."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter

    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        assert sorted(f.name for f in subflows) == ["iteration-1", "iteration-2"]
        names = {
            run.name
            for fid in [flow_run_id, *(f.id for f in subflows)]
            for run in client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id={"any_": [fid]}), limit=200)
        }
    layers = {f"{task}-layer{layer}" for task in ("layer-stats", "local-prune") for layer in (0, 1)}
    wanted = {"accumulate-layer0", "export-compact", "export-masked"} | {f"search-generation-gen{g}" for g in (1, 2)}
    assert layers | wanted <= names, names


def _check_artifacts(run_id: str, tyr_ppl: float) -> None:
    """What a person sees in the UI: the summary, a table per iteration, and the search progress at 100%, each in
    the run it belongs to."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.reports import artifact_key

    names = ["summary", "iteration-1", "iteration-2", "search-1", "search-2"]
    wanted = {artifact_key(run_id, n): n for n in names}
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(wanted))))
    latest = {wanted[a.key]: a for a in sorted(found, key=lambda a: a.created)}
    assert set(latest) == set(names)
    assert "tyr (searched)" in latest["summary"].data and f"{tyr_ppl:,.2f}" in latest["summary"].data
    assert "data:image/png;base64," in latest["summary"].data
    assert "Iterations run: 2. Final model: iteration" in latest["summary"].data
    assert "| 0 |" in latest["iteration-2"].data and "| 1 |" in latest["iteration-2"].data
    assert latest["search-1"].data == 100.0 and latest["search-2"].data == 100.0
    # published from a background thread, each still belongs to the run (and a task's to its task run)
    assert all(a.flow_run_id is not None for a in latest.values())
    assert all(latest[n].task_run_id is not None for n in ["summary", "iteration-1", "iteration-2"])
