"""Shared fixtures: tiny random models of every supported family, saved as HF folders (no network); one real Prefect
server for the tests that need one; tests marked ``gpu`` skipped where there is no CUDA device."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    return cls(**{**_COMMON, **overrides})


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32).eval()
    if family == "qwen2":  # random init leaves biases at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if family == "qwen3":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> callable:
    """``tiny_folder(family)`` -> a saved HF folder of a seeded tiny random model of that family."""
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            tiny_model(family).save_pretrained(out, safe_serialization=True)
            cache[family] = out
        return cache[family]

    return make


@pytest.fixture
def windows() -> torch.Tensor:
    """Structured pseudo-text: a random walk over the vocabulary gives correlated activations."""
    g = torch.Generator().manual_seed(1)
    steps = torch.randint(-3, 4, (24, 32), generator=g)
    return (steps.cumsum(dim=1) + torch.randint(0, 128, (24, 1), generator=g)) % 128


def pytest_collection_modifyitems(config, items) -> None:
    """``gpu`` tests need CUDA: where there is none they are reported as skipped, not failed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class PrefectServer:
    """A real ``prefect server`` on loopback, with the process work pool ``tyr-process`` created."""

    api_url: str
    home: Path
    env: dict[str, str]  # for subprocesses (CLI, deploy, workers): this server's API and PREFECT_HOME

    def cli(self, *args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
        """``prefect ARGS`` against this server, from the repository root."""
        command = [sys.executable, "-m", "prefect", *args]
        repo = Path(__file__).resolve().parents[1]
        return subprocess.run(command, env=env or self.env, cwd=repo, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """One Prefect server (SQLite, in a PREFECT_HOME of its own) shared by every test that needs one, started on first
    use and stopped at the end of the session."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed with the server
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(api_url, proc, home / "server.log")
        server = PrefectServer(api_url, home, env)
        created = server.cli("work-pool", "create", "tyr-process", "--type", "process", timeout=300)
        assert created.returncode == 0, created.stdout + created.stderr
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _wait_healthy(api_url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server did not answer in {timeout:.0f} s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def in_process_client(server: PrefectServer) -> Iterator[None]:
    """Flows run in this process report to ``server``; pending logs and events are sent before the block ends."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        with _temporary_global_settings_context(get_settings_context()):
            try:
                yield
            finally:
                with contextlib.suppress(RuntimeError):  # a worker that never started
                    APILogWorker.instance().drain()
                EventsWorker.drain_all(timeout=30)
