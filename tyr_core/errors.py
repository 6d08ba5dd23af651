"""Named errors raised at tyr's boundaries. Every message says which field, file or key is wrong and what to do."""

from __future__ import annotations


class TyrError(Exception):
    """Base class of every error tyr raises on purpose."""


class ConfigError(TyrError, ValueError):
    """A configuration value is invalid or inconsistent."""


class UnsupportedModelError(TyrError, ValueError):
    """The model is not a Llama-family causal LM that tyr can prune."""


class ModelNotFoundError(TyrError, FileNotFoundError):
    """The model path does not exist or holds no weights."""


class GridError(TyrError, ValueError):
    """The requested sparsity cannot be expressed in whole groups by this model."""


class CalibrationError(TyrError, ValueError):
    """Calibration or evaluation text is missing, empty or unreadable."""


class ArtefactError(TyrError):
    """A stored artefact is missing, incomplete or corrupt."""


class CorruptArtefactError(ArtefactError):
    """An artefact's bytes do not match the sha256 recorded in its manifest."""


class MissingArtefactError(ArtefactError, KeyError):
    """An artefact that should have been committed is not in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class IncompatibleRunError(TyrError):
    """A run id is being resumed with a configuration different from the one it was started with."""


class StoreError(TyrError):
    """The artefact store is unreachable, misconfigured or refused an operation."""


class ExportError(TyrError):
    """A pruned layout cannot be written in the requested export format."""


class RunLockedError(TyrError):
    """Another live process is driving this run id."""


class LockLostError(RunLockedError):
    """This process lost the run's lock (another driver took it over); it stops writing to the run."""


class InvalidKeyError(StoreError, ValueError):
    """An artefact key could address something outside the store's root or prefix."""


class StoreUnreachableError(StoreError):
    """The store's endpoint did not answer (server down, wrong endpoint URL, network)."""


class StoreCredentialsError(StoreError):
    """The store rejected the credentials, or they are not allowed to do what was asked."""


class NoSuchBucketError(StoreError):
    """The S3 bucket named in the store URL does not exist."""


class SearchError(TyrError, ValueError):
    """A search input does not fit: a candidate or state vs. the genome, or window ids vs. the teacher cache."""
