"""Prefect result records are read back as JSON only.

tyr writes its task and flow results with ``RESULT_SERIALIZER`` (plain JSON, no object decoder), but Prefect decodes
a stored record with the serializer the record itself names, on every read: a task's cache lookup on resume or Retry
(``exists`` and ``read``), and a finished (sub)flow's result. Whoever can write the result storage (a folder, or an
S3 bucket beside the artefacts) could otherwise plant a ``pickle`` record, or a JSON one with an object decoder or
another JSON library, and run code in the next process that reads it.

``install_result_guard`` puts a check in front of Prefect's record decoding, whatever storage the record came from:
a record (or its separate metadata, or the serializer used for a bare payload) whose serializer is anything but
JSON with the stdlib ``json`` module, no object decoder and no loader arguments is refused with
``UnsafeResultError`` before anything is decoded. Where Prefect only asks whether a result exists, a refused record
counts as absent and the task computes again (its committed artefact makes that cheap), replacing the record.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.serializers import JSONSerializer, Serializer
from pydantic import ValidationError

from tyr_core.errors import ArtefactError

log = logging.getLogger(__name__)

_installed = False
_install_lock = threading.Lock()


class UnsafeResultError(ArtefactError):
    """A stored Prefect result record names a decoder that could run code (pickle, an object decoder)."""


def is_safe_serializer(serializer: Any) -> bool:
    """Whether reading with ``serializer`` only parses JSON: stdlib ``json``, no object decoder, no loader arguments
    (which could name a hook)."""
    return (
        type(serializer) is JSONSerializer
        and serializer.type == "json"
        and serializer.jsonlib == "json"
        and serializer.object_decoder is None
        and not serializer.loads_kwargs
    )


def _describe(serializer: Any) -> str:
    if not isinstance(serializer, Serializer):
        return repr(type(serializer).__name__)
    kind = getattr(serializer, "type", "?")
    if kind == "json":
        return (
            f"'json' with jsonlib={getattr(serializer, 'jsonlib', None)!r}, "
            f"object_decoder={getattr(serializer, 'object_decoder', None)!r}, "
            f"loads_kwargs={getattr(serializer, 'loads_kwargs', None)!r}"
        )
    return repr(kind)


def check_serializer(serializer: Any, where: str = "a stored Prefect result record") -> None:
    """Raise ``UnsafeResultError`` unless ``serializer`` only parses JSON."""
    if is_safe_serializer(serializer):
        return
    raise UnsafeResultError(
        f"{where} names the serializer {_describe(serializer)}; tyr reads back only JSON results without an object "
        "decoder, since any other decoder can run code. Someone other than tyr wrote it into the result storage "
        "(PREFECT_LOCAL_STORAGE_PATH, or the PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK bucket): check who can write there, "
        "then delete the record (tyr computes the result again from the run's committed artefacts)"
    )


def check_record_bytes(data: bytes, backup_serializer: Serializer | None = None) -> None:
    """Refuse the stored ``data`` of a result record unless it decodes with a JSON-only serializer: the record's own
    (a missing one means pickle to Prefect), or ``backup_serializer`` when ``data`` is not a record at all."""
    try:
        record = ResultRecord.model_validate_json(data)
    except ValidationError:
        if backup_serializer is not None:
            check_serializer(backup_serializer, "the serializer for a stored result that is not a record")
        return  # without a backup serializer Prefect raises the validation error itself
    check_serializer(record.metadata.serializer)


def install_result_guard() -> None:
    """Check every result record before Prefect decodes it, in this process (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        deserialize = ResultRecord.deserialize.__func__  # type: ignore[attr-defined]
        from_parts = ResultRecord.deserialize_from_result_and_metadata.__func__  # type: ignore[attr-defined]

        def guarded_deserialize(cls: type, data: bytes, backup_serializer: Serializer | None = None) -> Any:
            try:
                check_record_bytes(data, backup_serializer)
            except UnsafeResultError as err:  # said here too: Prefect's existence check swallows it (recomputes)
                log.warning("refused a stored Prefect result: %s", err)
                raise
            return deserialize(cls, data, backup_serializer)

        def guarded_from_parts(cls: type, result: bytes, metadata: bytes) -> Any:
            check_serializer(ResultRecordMetadata.load_bytes(metadata).serializer, "stored Prefect result metadata")
            return from_parts(cls, result, metadata)

        ResultRecord.deserialize = classmethod(guarded_deserialize)  # type: ignore[method-assign,assignment]
        ResultRecord.deserialize_from_result_and_metadata = classmethod(  # type: ignore[method-assign,assignment]
            guarded_from_parts
        )
        _installed = True
