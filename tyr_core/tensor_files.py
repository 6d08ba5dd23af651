"""Reading safetensors artefacts back: bytes that safetensors cannot parse, or that lack a tensor the reader needs, are
a corrupt artefact (a ``CorruptArtefactError``, which no task retries), named with the fix, never a parser error that
looks transient."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .errors import CorruptArtefactError, TyrError

# what safetensors and torch raise for a malformed header, an overflowing shape or offsets past the end
_MALFORMED = (SafetensorError, ValueError, RuntimeError, OverflowError, MemoryError)


def corrupt_tensors(what: str, path: Path, problem: str) -> CorruptArtefactError:
    """The error for an unusable safetensors artefact: what it is, where, what is wrong, and what to do."""
    return CorruptArtefactError(
        f"{what} ({path}) is corrupt: {problem}; delete its manifest (KEY.manifest.json in the run's store) and "
        "the object it names, and resume: the run recomputes it"
    )


@contextmanager
def open_tensors(path: Path, what: str) -> Iterator[Any]:
    """``safe_open(path)``, with a malformed file (in opening or in reading inside the block) raised as corrupt.

    Raises:
        CorruptArtefactError: the bytes are not a safetensors file safetensors can read.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except TyrError:
        raise
    except _MALFORMED as err:
        raise corrupt_tensors(what, path, f"not a readable safetensors file ({type(err).__name__}: {err})") from None


def load_tensors(path: Path, what: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of a safetensors artefact.

    Raises:
        CorruptArtefactError: the bytes are malformed or a tensor is missing.
    """
    with open_tensors(path, what) as f:
        missing = sorted(set(names) - set(f.keys()))
        if missing:
            raise corrupt_tensors(what, path, f"it has no tensor {', '.join(map(repr, missing))}")
        return {name: f.get_tensor(name) for name in names}
