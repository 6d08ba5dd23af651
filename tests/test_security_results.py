"""Prefect result records are read back as JSON only: a record planted in the result storage that names pickle, an
object decoder or another JSON library is refused before Prefect decodes it, on a new flow run of the same work and
on Retry of a flow run, for task results and subflow results alike (real Prefect server, real local storage)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.serializers import JSONSerializer, PickleSerializer

from tasks.policies import JSON_RESULTS, RESULT_SERIALIZER
from tests.conftest import in_process_client
from tyr_runtime.results import UnsafeResultError, check_record_bytes, is_safe_serializer

KEY = "tyr-sec-results-step"


class _Payload:
    """Unpickling this leaves a marker file: proof that a planted record's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


def _pickle_b64(marker: Path) -> str:
    import pickle

    return base64.b64encode(pickle.dumps(_Payload(marker))).decode()


PLANTS = {
    "pickle": lambda m: {"type": "pickle", "picklelib": "pickle", "picklelib_version": None},
    "cloudpickle": lambda m: {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None},
    "compressed pickle": lambda m: {"type": "compressed/pickle", "compressionlib": "lzma"},
    "json with pickle as its jsonlib": lambda m: {"type": "json", "jsonlib": "pickle", "object_decoder": None},
    "json with an object decoder": lambda m: {
        "type": "json",
        "jsonlib": "json",
        "object_decoder": "prefect.serializers.prefect_json_object_decoder",
    },
}


def _plant(path: Path, serializer: dict, marker: Path) -> None:
    """Rewrite a stored record as a writer of the result storage could: same key, another serializer."""
    record = json.loads(path.read_text())
    record["metadata"]["serializer"] = serializer
    record["result"] = _pickle_b64(marker)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("name", list(PLANTS))
def test_a_record_naming_any_decoder_but_plain_json_is_refused_before_decoding(tmp_path, name):
    marker = tmp_path / "RAN"
    record = {"metadata": {"serializer": PLANTS[name](marker), "storage_key": "k"}, "result": _pickle_b64(marker)}
    with pytest.raises(UnsafeResultError, match="serializer"):
        check_record_bytes(json.dumps(record).encode())
    # a record without a serializer is a pickle to Prefect (its default)
    with pytest.raises(UnsafeResultError, match="'pickle'"):
        check_record_bytes(json.dumps({"metadata": {"storage_key": "k"}, "result": _pickle_b64(marker)}).encode())
    assert not marker.exists()


def test_tyrs_own_records_pass_and_only_they():
    assert is_safe_serializer(RESULT_SERIALIZER)
    assert not is_safe_serializer(JSONSerializer())  # Prefect's default JSON decodes '__class__' objects
    assert not is_safe_serializer(JSONSerializer(object_decoder=None, loads_kwargs={"parse_float": "x"}))
    assert not is_safe_serializer(PickleSerializer())
    good = {"metadata": {"serializer": RESULT_SERIALIZER.model_dump(), "storage_key": "k"}, "result": '{"a": 1}'}
    check_record_bytes(json.dumps(good).encode())
    with pytest.raises(UnsafeResultError, match="not a record"):
        check_record_bytes(b"\x80\x04junk", backup_serializer=PickleSerializer())


# -------------------------------------------------------------------------------- through Prefect itself

_CALLS: list[str] = []


@task(cache_key_fn=lambda *_: KEY, persist_result=True, **JSON_RESULTS)
def _step(x: int) -> dict:
    _CALLS.append("step")
    return {"value": x * 2}


@flow(name="tyr-sec-sub", persist_result=True, result_serializer=RESULT_SERIALIZER)
def _sub(x: int) -> dict:
    return {"sub": x}


@flow(name="tyr-sec-results", persist_result=True, result_serializer=RESULT_SERIALIZER)
def _parent(x: int, fail_flag: str = "") -> dict:
    step = _step(x)
    sub = _sub(x)
    if fail_flag and Path(fail_flag).exists():
        raise RuntimeError("failing once, as a crash would")
    return {"step": step, "sub": sub}


@pytest.fixture
def results_home(prefect_server, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    storage = tmp_path / "storage"
    storage.mkdir()
    with in_process_client(prefect_server), temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: storage}):
        yield storage


@pytest.mark.parametrize("name", ["cloudpickle", "json with an object decoder"])
def test_a_planted_task_record_never_runs_on_a_new_flow_run_and_the_task_computes_again(results_home, tmp_path, name):
    marker = tmp_path / "RAN"
    _CALLS.clear()
    assert _parent(3)["step"] == {"value": 6}
    assert _CALLS == ["step"]
    _plant(results_home / KEY, PLANTS[name](marker), marker)

    again = _parent(3)  # a resume: the task's cache key finds the planted record
    assert not marker.exists(), "a planted result record was decoded"
    assert again["step"] == {"value": 6}
    assert _CALLS == ["step", "step"]  # refused as if absent, so computed again
    rewritten = json.loads((results_home / KEY).read_text())
    assert rewritten["metadata"]["serializer"]["type"] == "json"  # the planted record is replaced


def test_a_planted_record_never_runs_on_retry_of_the_flow_run(results_home, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import AwaitingRetry

    marker = tmp_path / "RAN"
    fail = tmp_path / "fail-once"
    fail.write_text("")
    state = _parent(5, str(fail), return_state=True)
    assert state.is_failed()
    flow_run_id = state.state_details.flow_run_id
    records = [p for p in results_home.iterdir() if p.is_file() and "metadata" in json.loads(p.read_text())]
    assert KEY in {p.name for p in records}
    for path in records:  # every stored record: the task's (its cache lookup on Retry) and any other
        _plant(path, PLANTS["cloudpickle"](marker), marker)
    fail.unlink()

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, AwaitingRetry(), force=True)
        flow_run = client.read_flow_run(flow_run_id)
    try:
        retried = run_flow(_parent, flow_run=flow_run, parameters={"x": 5, "fail_flag": str(fail)}, return_type="state")
    except UnsafeResultError:
        retried = None  # refused outright: as good as a refusal inside the state
    assert not marker.exists(), "a planted result record was decoded on Retry"
    if retried is not None and retried.is_failed():
        with pytest.raises(UnsafeResultError):
            retried.result()


def test_the_guard_is_installed_wherever_the_flow_is_imported():
    import subprocess
    import sys

    code = (
        "import flows.tyr\n"
        "from prefect._internal.result_records import ResultRecord\n"
        "print(ResultRecord.deserialize.__func__.__name__)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=repo)
    assert out.stdout.strip() == "guarded_deserialize", out.stderr[-2000:]
