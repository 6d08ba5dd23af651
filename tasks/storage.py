"""The S3 store (the only boto3 user) and the factory that turns a store URL into a ``Store``.

Any S3-compatible endpoint works through ``endpoint_url``. Credentials come from the standard AWS chain
(environment, profile, instance role) unless given; they never appear in logs, messages, ``repr`` or ``url``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from tyr_core.errors import MissingArtefactError, StoreError
from tyr_core.store import FileStore, Store, check_key

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_CRED_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}
_TRANSFER = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4)


class S3Store:
    """Objects under ``s3://bucket/prefix/`` on any S3-compatible endpoint."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        connect_timeout: float = 5,
        read_timeout: float = 60,
        max_attempts: int = 6,
    ):
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{self.prefix}" + (f" at {endpoint_url}" if endpoint_url else "")
        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            s3={"addressing_style": "path"},
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=region or "us-east-1"
        )
        self.client = session.client("s3", endpoint_url=endpoint_url, config=config)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    def scoped(self, sub: str) -> S3Store:
        """The same bucket and client under ``prefix/sub/``."""
        child = object.__new__(S3Store)
        child.__dict__.update(self.__dict__)
        child.prefix = self.prefix + sub.strip("/") + "/"
        child.url = f"s3://{self.bucket}/{child.prefix}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        return child

    def _k(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _fail(self, err: Exception, action: str, key: str = "") -> StoreError:
        where = f"{action} {key!r} in {self.url}" if key else f"{action} {self.url}"
        if isinstance(err, EndpointConnectionError) or "Connect timeout" in str(err):
            return StoreError(f"cannot reach the S3 endpoint ({where}): start the server or fix endpoint_url")
        if isinstance(err, ClientError):
            code = err.response.get("Error", {}).get("Code", "")
            if code in _CRED_CODES:
                return StoreError(
                    f"the S3 credentials were rejected ({code}) while trying to {where}; "
                    "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the credentials block"
                )
            if code == "NoSuchBucket":
                return StoreError(f"bucket {self.bucket!r} does not exist ({where}); create it or fix the store URL")
            return StoreError(f"S3 refused to {where}: {code or err}")
        return StoreError(f"S3 error while trying to {where}: {type(err).__name__}")

    def _missing(self, err: ClientError) -> bool:
        return err.response.get("Error", {}).get("Code", "") in ("NoSuchKey", "404", "NotFound")

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)
        except (ClientError, BotoCoreError) as err:
            raise self._fail(err, "write", key) from None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412 or err.response.get("Error", {}).get("Code") == "PreconditionFailed":
                return False
            raise self._fail(err, "create", key) from None
        except BotoCoreError as err:
            raise self._fail(err, "create", key) from None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except ClientError as err:
            if self._missing(err):
                raise MissingArtefactError(f"{key!r} is not in {self.url}") from None
            raise self._fail(err, "read", key) from None
        except BotoCoreError as err:
            raise self._fail(err, "read", key) from None

    def put_file(self, key: str, path: Path) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._k(key), Config=_TRANSFER)
        except (ClientError, BotoCoreError) as err:
            raise self._fail(err, "upload", key) from None
        except OSError as err:
            raise StoreError(f"cannot read {path} to upload it as {key!r}: {err.strerror}") from None

    def get_file(self, key: str, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        try:
            self.client.download_file(self.bucket, self._k(key), str(tmp), Config=_TRANSFER)
        except ClientError as err:
            tmp.unlink(missing_ok=True)
            if self._missing(err):
                raise MissingArtefactError(f"{key!r} is not in {self.url}") from None
            raise self._fail(err, "download", key) from None
        except BotoCoreError as err:
            tmp.unlink(missing_ok=True)
            raise self._fail(err, "download", key) from None
        tmp.replace(path)

    def _head(self, key: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as err:
            if self._missing(err):
                return None
            raise self._fail(err, "inspect", key) from None
        except BotoCoreError as err:
            raise self._fail(err, "inspect", key) from None

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise MissingArtefactError(f"{key!r} is not in {self.url}")
        return int(head["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                out += [o["Key"][len(self.prefix) :] for o in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as err:
            raise self._fail(err, "list", prefix) from None
        return sorted(out)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._k(key))
        except (ClientError, BotoCoreError) as err:
            raise self._fail(err, "delete", key) from None


def open_store(url: str, endpoint_url: str | None = None, **creds) -> Store:
    """``file:///path`` (or a plain path) -> FileStore; ``s3://bucket/prefix`` -> S3Store."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise StoreError(f"store URL {url!r} names no bucket; use s3://BUCKET/PREFIX")
        return S3Store(bucket, prefix, endpoint_url=endpoint_url, **creds)
    if url.startswith("file://"):
        return FileStore(url[len("file://") :])
    if "://" in url:
        raise StoreError(f"store URL {url!r} has an unsupported scheme; use file:///PATH or s3://BUCKET/PREFIX")
    return FileStore(url)


def run_store(base_url: str, run_id: str, endpoint_url: str | None = None, **creds) -> Store:
    """The store scoped to one run: ``<base>/runs/<run_id>/``; nothing a run does can leave that prefix."""
    if not _RUN_ID.match(run_id):
        raise StoreError(f"run id {run_id!r} must be letters, digits, '-', '_' or '.', and not start with them")
    base = open_store(base_url, endpoint_url, **creds)
    if isinstance(base, S3Store):
        return base.scoped(f"runs/{run_id}")
    return FileStore(base.root / "runs" / run_id)


def check_store(store: Store) -> None:
    """A cheap probe (list one key) that fails early with a clear message when the store is unusable."""
    store.list("run.json")
