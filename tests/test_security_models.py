"""Model folders as hostile inputs: sizes in config.json out of any real model's range are refused as bad input
(exit 2) before anything divides by them or allocates for them, and weights are only ever read from safetensors:
a decoy ``*.safetensors`` beside a pickled ``pytorch_model.bin`` does not make the folder acceptable."""

from __future__ import annotations

import json
import shutil

import pytest

from tyr_cli import main
from tyr_core.errors import ModelNotFoundError, UnsupportedModelError
from tyr_core.families import geometry, load_config, resolve_model

HOSTILE = {
    "heads=0": {"num_attention_heads": 0},
    "negative hidden size": {"hidden_size": -64},
    "negative intermediate size": {"intermediate_size": -1},
    "6000 layers": {"num_hidden_layers": 6000},
    "huge intermediate": {"intermediate_size": 2**40},
    "kv heads=0": {"num_key_value_heads": 0},
    "a string of layers": {"num_hidden_layers": "12"},
}


def _hostile_folder(tiny_folder, tmp_path, values: dict):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    config.pop("head_dim", None) if "num_attention_heads" in values else None
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_sizes_are_refused_naming_the_field(tiny_folder, tmp_path, case):
    folder = _hostile_folder(tiny_folder, tmp_path, HOSTILE[case])
    field = next(iter(HOSTILE[case]))
    with pytest.raises(UnsupportedModelError, match=rf"{field}=.*out of range"):
        geometry(load_config(folder))


@pytest.mark.parametrize("case", ["heads=0", "6000 layers"])
def test_tyr_prune_refuses_them_with_exit_2(tiny_folder, tmp_path, case, capsys):
    folder = _hostile_folder(tiny_folder, tmp_path, HOSTILE[case])
    store = tmp_path / "store"
    code = main(["prune", str(folder), "--sparsity", "0.5", "--recipe", "tiny-test", "--store", f"file://{store}"])
    assert code == 2, capsys.readouterr()
    assert "out of range" in capsys.readouterr().err


def test_a_decoy_safetensors_beside_a_pickle_is_refused(tiny_folder, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tiny_folder("llama") / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle tyr must never load")
    (folder / "decoy.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(
        ModelNotFoundError, match=r"model\.safetensors or model\.safetensors\.index\.json\).*never unpickles"
    ):
        resolve_model(folder)


def test_every_shipped_model_load_asks_for_safetensors():
    """The loaders tyr ships pass use_safetensors=True (a GGUF file is the one other format it reads)."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    missing = []
    for path in [*sorted((repo / "tyr_core").rglob("*.py")), *sorted((repo / "tyr_runtime").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                owner = getattr(node.func.value, "id", "")
                names = {k.arg for k in node.keywords}
                if owner == "AutoModelForCausalLM" and not names & {"use_safetensors", "gguf_file"}:
                    missing.append(f"{path.relative_to(repo)}:{node.lineno}")
    assert missing == []
