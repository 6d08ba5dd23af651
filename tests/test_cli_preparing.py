"""What a first run prepares before the flow starts (a model's conversion, a download) is named in the CLI's display
while it runs, with its duration once done, and the libraries' own progress bars stay off it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from tqdm.auto import tqdm

from tyr_cli import main
from tyr_cli.common import err_console
from tyr_cli.progress import preparing

REAL_CACHE = Path(os.environ.get("TYR_CACHE", Path.home() / ".cache" / "tyr"))


def test_each_preparation_is_named_and_timed_and_library_bars_stay_off_the_display(capsys):
    stderr = sys.stderr
    with preparing() as announce:
        announce("preparing SmolLM2-135M (conversion, once)")
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):  # as transformers draws it
            pass
        announce("fetching the Shakespeare texts (once)")
    err = capsys.readouterr().err
    assert "preparing SmolLM2-135M (conversion, once)\n" in err
    assert "preparing SmolLM2-135M (conversion, once): done in " in err
    assert "fetching the Shakespeare texts (once): done in " in err
    assert "Converting" not in err and "it/s" not in err
    assert sys.stderr is stderr and err_console._file is None  # the display writes where it did before


def test_a_preparation_that_fails_is_not_reported_done(capsys):
    with pytest.raises(OSError), preparing() as announce:
        announce("fetching the Shakespeare texts (once)")
        raise OSError("no network")
    err = capsys.readouterr().err
    assert "fetching the Shakespeare texts (once)\n" in err and "done in" not in err


def test_nothing_is_announced_where_nothing_is_prepared(capsys):
    with preparing():
        pass
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not (REAL_CACHE / "models").is_dir(), reason="SmolLM2 is not converted in the cache yet")
def test_prune_names_the_model_it_builds_once_before_anything_starts(tmp_path, monkeypatch, capsys):
    """tiny-test's model is built from SmolLM2's tokenizer on first use: the plan's run says so, the next does not."""
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    for converted in (REAL_CACHE / "models").glob("SmolLM2-*"):  # the conversion done; the tiny model still to build
        (cache / "models" / converted.name).symlink_to(converted)
    monkeypatch.setenv("TYR_CACHE", str(cache))
    argv = ["prune", "tiny-test", "--dry-run", "--store", f"file://{tmp_path / 'store'}"]

    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "preparing tiny-random-llama (once)" in err and "preparing tiny-random-llama (once): done in " in err
    assert "%|" not in err  # no tqdm bar
    assert main(argv) == 0
    assert "preparing" not in capsys.readouterr().err


def test_a_conversion_is_announced_with_the_model_name_before_it_starts_and_not_once_done(tmp_path, monkeypatch):
    import transformers

    from tyr_core.errors import ModelNotFoundError
    from tyr_core.families import SMOLLM2, resolve_model

    def unreadable(*_args, **_kwargs):
        raise ValueError("stop before the work: only the announcement is under test")

    told: list[str] = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unreadable)
    with pytest.raises(ModelNotFoundError):
        resolve_model(SMOLLM2, tmp_path / "empty-cache", announce=told.append)
    assert told == ["preparing SmolLM2-135M (conversion, once)"]
    monkeypatch.undo()
    resolve_model(SMOLLM2, REAL_CACHE)  # this install's file converted, if it was not yet
    resolve_model(SMOLLM2, REAL_CACHE, announce=told.append)  # converted before: nothing to say
    assert len(told) == 1
