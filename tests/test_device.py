"""The device setting on a CPU-only machine: names, refusals before any work, streamed blocks, placement."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_model

from tyr_core.config import RunConfig
from tyr_core.device import resolve_device
from tyr_core.errors import ConfigError
from tyr_core.evaluate import perplexity
from tyr_core.layerwise import Activations, LayerwiseModel
from tyr_core.pipeline import Placement, check_fits, resident_or_streamed
from tyr_core.prefix import PrefixForward
from tyr_core.streaming import BlockStreamer

CAL = {"files": ["x.txt"], "seq_len": 32, "num_windows": 4}


def test_device_names_resolve_or_are_refused_naming_the_setting():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device='tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device='cuda:3'.*device=cpu"):
            resolve_device("cuda:3")
    with pytest.raises(ConfigError, match="device"):
        from tyr_core.config import load_run_config

        load_run_config({"calibration": CAL}, ["device=gpu0"])


def test_device_settings_are_outside_the_artefact_hash():
    base = RunConfig.model_validate({"calibration": CAL})
    moved = RunConfig.model_validate(
        {"calibration": CAL, "device": "cuda:1", "deterministic": True, "device_memory_mb": 4096}
    )
    assert base.artefact_hash() == moved.artefact_hash()
    assert base.artefact_hash() != RunConfig.model_validate({"calibration": CAL, "seed": 1}).artefact_hash()


def test_a_run_that_cannot_fit_the_device_is_refused_before_it_starts(tiny_folder):
    lm = LayerwiseModel(tiny_folder("llama"))
    cfg = RunConfig.model_validate({"calibration": CAL})
    with pytest.raises(ConfigError, match="device_memory_mb allows 0.0 GiB on cuda"):
        check_fits(lm, cfg, Placement(torch.device("cuda"), 1 << 10))
    check_fits(lm, cfg, Placement(torch.device("cuda"), 1 << 30))  # fits: no error
    check_fits(lm, cfg, Placement(torch.device("cpu"), 0))  # the CPU has no device budget to exceed


def test_activations_go_to_host_memory_then_disk_on_a_cpu(tmp_path):
    small = Activations((2, 4, 8), torch.float32, 1 << 20, tmp_path, device="cpu", device_budget=1 << 30)
    assert small.placement == "host" and not small.spilled  # a CPU has no device tier
    big = Activations((2, 4, 8), torch.float32, 16, tmp_path)
    assert big.placement == "disk" and big.spilled


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_blocks_give_the_resident_models_logits_bit_for_bit(family, windows):
    resident = tiny_model(family, num_hidden_layers=3)
    streamed = tiny_model(family, num_hidden_layers=3)
    for m in (resident, streamed):
        m.config._attn_implementation = "sdpa"
    streamer = BlockStreamer(streamed, "cpu", always_copy=True)
    host = [p.data_ptr() for p in streamed.model.layers.parameters()]
    fwd = PrefixForward(streamed, [], 0, streamer)
    ids = windows[:4]
    with torch.inference_mode():
        want = resident(ids).logits
        got = fwd.logits(ids, [])
    assert torch.equal(got, want)
    assert streamer.blocks_moved == 3  # every block was copied in for its turn ...
    assert [p.data_ptr() for p in streamed.model.layers.parameters()] == host  # ... and the host copy stays bound
    assert perplexity(streamed, windows[:6], logits_fn=lambda x: fwd.logits(x, [])) == perplexity(resident, windows[:6])


def test_the_search_model_stays_resident_on_a_cpu(tiny_folder):
    model = tiny_model("llama")
    fwd = resident_or_streamed(model, [], Placement(torch.device("cpu"), 0), 0)
    assert fwd.streamer is None
