"""In a run of a deployment, the caller (anyone who can reach the Prefect API) tunes the method only: paths, datasets,
text fields, stores, endpoints, Ray addresses, config files and local models come from the deployment's own
parameters, unless the deployment allows more in its env. A deployment run is what ``prefect.runtime`` says it is
(``PREFECT__RUNTIME__FLOW_RUN__DEPLOYMENT_ID``), and the deployment's own parameters are read from a real server."""

from __future__ import annotations

import pytest

from flows.recipes import resolve_config
from tests.conftest import in_process_client
from tyr_core.errors import ConfigError
from tyr_runtime import safety
from tyr_runtime.runs import open_run

DEPLOYMENT = "00000000-0000-0000-0000-0000000000d1"

REFUSED = {
    "a Ray cluster of the caller's": (["execution.engine=ray", "execution.address=ray://attacker:10001"], "execution"),
    "the worker's files as calibration text": (["calibration.files=[/root/.config]"], "calibration.files"),
    "a credentials file's field as text": (["calibration.text_field=refresh_token"], "calibration.text_field"),
    "the worker's files as held-out text": (["eval.files=[/etc]"], "eval.files"),
    "a dataset of the caller's": (["calibration.dataset=evil/exfil"], "calibration.dataset"),
    "a whole section": (["calibration={files: [/etc], text_field: x}"], "calibration"),
    "remote code": (["model.trust_remote_code=true"], "model.trust_remote_code"),
    "another model through overrides": (["model.source=/srv/models/private"], "model.source"),
    "a device": (["device=cuda:7"], "device"),
}


@pytest.fixture
def deployment_run(monkeypatch):
    """A run of a deployment whose own parameters are ``own`` (set by the test); nothing allowed by env."""
    own: dict = {}
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__DEPLOYMENT_ID", DEPLOYMENT)
    monkeypatch.delenv(safety.ALLOW_PARAMETERS_ENV, raising=False)
    monkeypatch.delenv(safety.ALLOW_ENV, raising=False)
    monkeypatch.setattr(safety, "_deployment_parameters", lambda deployment: own)
    return own


@pytest.mark.parametrize("case", list(REFUSED))
def test_overrides_outside_the_methods_settings_are_refused_naming_the_key(deployment_run, case):
    overrides, key = REFUSED[case]
    with pytest.raises(ConfigError, match=rf"^{key.split('=')[0]}\b.*refused in a run of deployment {DEPLOYMENT}"):
        resolve_config("tiny-test", overrides=overrides)


def test_the_methods_settings_pass(deployment_run):
    config = resolve_config(
        "tiny-test",
        iterations=2,
        generations=1,
        overrides=[
            "prune.num_levels=3",
            "search.offspring=2",
            "teacher.topk=16",
            "calibration.num_windows=8",
            "calibration.seq_len=16",
            "eval.max_windows=2",
            "export.formats=[compact]",
            "seed=3",
        ],
    )
    assert config.prune.num_levels == 3 and config.calibration.num_windows == 8 and config.seed == 3


def test_the_deployments_own_overrides_and_its_env_allow_more(deployment_run, monkeypatch):
    deployment_run["overrides"] = ["execution.engine=ray", "execution.replicas=2"]
    resolve_config("tiny-test", overrides=["execution.engine=ray", "execution.replicas=2"])  # its own: accepted
    with pytest.raises(ConfigError, match="execution.replicas"):
        resolve_config("tiny-test", overrides=["execution.engine=ray", "execution.replicas=8"])  # not its own value
    monkeypatch.setenv(safety.ALLOW_PARAMETERS_ENV, "execution.replicas")
    resolve_config("tiny-test", overrides=["execution.replicas=8"])


def test_places_in_flat_parameters_are_refused(deployment_run, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: {source: tiny-random-llama}\n")
    with pytest.raises(ConfigError, match=r"^preset .*a file or folder on the worker"):
        resolve_config(str(config))
    with pytest.raises(ConfigError, match=r"^model .*a file or folder on the worker"):
        resolve_config(model=str(tmp_path), target_sparsity=0.5)
    with pytest.raises(ConfigError, match="unknown recipe"):  # a recipe is a name, never a path to any YAML file
        resolve_config(model="tiny-random-llama", recipe="../../../" + str(config.with_suffix("")), target_sparsity=0.5)
    resolve_config(model="tiny-random-llama", recipe="tiny-test", target_sparsity=0.5)  # names are fine


def test_a_store_or_endpoint_of_the_callers_is_refused_before_anything_is_written(deployment_run, tmp_path):
    config = resolve_config("tiny-test")
    for store_url, endpoint in ((f"file://{tmp_path / 'theirs'}", None), (None, "http://attacker.example:9000")):
        with pytest.raises(ConfigError, match=r"^(store_url|endpoint_url) .*refused in a run of deployment"):
            open_run(config, "r1", store_url, endpoint)
    assert not (tmp_path / "theirs").exists()


def test_outside_a_deployment_nothing_is_limited(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT__RUNTIME__FLOW_RUN__DEPLOYMENT_ID", raising=False)
    config = resolve_config("tiny-test", overrides=["calibration.text_field=body", "execution.engine=ray"])
    assert config.calibration.text_field == "body"


def test_the_deployments_own_parameters_are_read_from_the_server(prefect_server, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="tyr-sec-deployed")
    def deployed() -> None:
        return None

    with in_process_client(prefect_server), get_client(sync_client=True) as client:
        flow_id = client.create_flow(deployed)
        deployment = client.create_deployment(
            flow_id=flow_id,
            name="sec-params",
            parameters={"model": "tiny-random-llama", "overrides": ["execution.engine=ray"]},
        )
        assert safety._deployment_parameters(str(deployment))["overrides"] == ["execution.engine=ray"]
        monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__DEPLOYMENT_ID", str(deployment))
        monkeypatch.delenv(safety.ALLOW_PARAMETERS_ENV, raising=False)
        resolve_config("tiny-test", overrides=["execution.engine=ray"])
        with pytest.raises(ConfigError, match="execution.address"):
            resolve_config("tiny-test", overrides=["execution.engine=ray", "execution.address=ray://attacker:10001"])
