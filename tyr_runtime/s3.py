"""The S3 store, the only boto3 user.

Any S3-compatible endpoint works through ``endpoint_url``, as long as it honours conditional writes
(``PutObject`` with ``If-None-Match: *``), which the commit protocol needs; ``check_store`` proves it. Credentials
come from the standard AWS chain (environment, profile, instance role) unless given; they never appear in logs,
messages, ``repr`` or ``url``.
"""

from __future__ import annotations

import copy
import logging
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error, RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from tyr_core.errors import (
    ConfigError,
    MissingArtefactError,
    NoSuchBucketError,
    StoreCredentialsError,
    StoreError,
    StoreUnreachableError,
)
from tyr_core.redaction import without_userinfo
from tyr_core.store import TEMP_PREFIX, check_key, check_prefix
from tyr_core.store.protocol import WriteGuard

log = logging.getLogger(__name__)

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's rule for bucket names
_REJECTED_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidSecurity",
}
_NOT_ALLOWED = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
# A 5xx that outlived botocore's retries is the server's own failure; this is the commonest one we have met.
_SERVER_FAULT_HINT = (
    "; the server failed after retries: see its log (SeaweedFS answers every write this way once its disk has "
    "under 1% free)"
)
# A broken response body is not covered by botocore's retries, which end once the headers arrive.
_STREAM_ERRORS = (ResponseStreamingError, ReadTimeoutError, IncompleteReadError)


class S3Store:
    """Objects under ``s3://bucket/prefix/`` on any S3-compatible endpoint.

    Args:
        bucket: the bucket; it must exist (``check_store`` says so clearly if it does not).
        prefix: the folder inside the bucket every key is relative to.
        endpoint_url: a non-AWS endpoint (SeaweedFS, MinIO, moto...); path-style addressing is used with it.
        region: the region; the AWS chain's (``AWS_DEFAULT_REGION``, profile) when None.
        access_key, secret_key, session_token: explicit credentials; the standard AWS chain when None.
        session: a ready ``boto3.Session`` (e.g. from a Prefect ``AwsCredentials`` block), instead of the above.
        connect_timeout, read_timeout: seconds per attempt.
        max_attempts: attempts per request (botocore "standard" retries: connection errors, 5xx, throttling).
        multipart_threshold, multipart_chunksize, max_concurrency: large-file transfers (``put_file``/``get_file``).
    """

    write_guard: WriteGuard | None = None  # called with the key before every write or delete (the run lock)

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        *,
        session: boto3.Session | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 6,
        multipart_threshold: int = 64 << 20,
        multipart_chunksize: int = 64 << 20,
        max_concurrency: int = 4,
    ):
        if not _BUCKET.match(bucket or ""):
            raise ConfigError(
                f"invalid S3 bucket name {bucket!r}: a bucket name has 3-63 characters, lowercase letters, digits, "
                "'.' and '-', and starts and ends with a letter or digit"
            )
        if (access_key is None) != (secret_key is None):
            raise ConfigError("give both access_key and secret_key, or neither (then the AWS chain is used)")
        self.bucket = bucket
        self.prefix = _as_prefix(prefix)
        self.endpoint_url = endpoint_url
        self.read_timeout = read_timeout
        self.max_attempts = max(1, max_attempts)
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
        )
        config = Config(
            retries={"mode": "standard", "max_attempts": self.max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        # The credentials live inside the client only: nothing on ``self`` prints them.
        self.client = _make_client(session, access_key, secret_key, session_token, region, endpoint_url, config)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def endpoint(self) -> str:
        """The endpoint this client talks to, without any user info: safe to log."""
        return without_userinfo(self.endpoint_url or self.client.meta.endpoint_url) or ""

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint!r})"

    def scoped(self, sub: str) -> S3Store:
        """The same bucket and client under ``prefix/sub/`` (``sub`` is validated like a key)."""
        child = copy.copy(self)
        child.prefix = self.prefix + check_key(sub.strip("/")) + "/"
        return child

    def _k(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _w(self, key: str) -> str:
        """``_k`` for a write or delete: the write guard may refuse it first."""
        if self.write_guard is not None:
            self.write_guard(key)
        return self._k(key)

    # ---------------------------------------------------------------------------------------------- errors

    def _error(self, err: BaseException, doing: str) -> StoreError:
        """A ``StoreError`` saying what failed and what to do; never quotes credentials."""
        cause = _underlying(err)
        where = f"{doing} in {self.url} (endpoint {self.endpoint})"
        if isinstance(cause, NoCredentialsError | PartialCredentialsError):
            return StoreCredentialsError(
                f"no usable S3 credentials to {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, an AWS "
                "profile, or a credentials block (the embedded server's pair: s3-credentials.json in its data folder)"
            )
        if isinstance(cause, BotoConnectionError):
            return StoreUnreachableError(
                f"cannot reach the S3 endpoint {self.endpoint} to {doing} in {self.url} "
                f"({type(cause).__name__}, {self.max_attempts} attempts): start the server or fix endpoint_url"
            )
        if isinstance(cause, ReadTimeoutError):
            return StoreUnreachableError(
                f"the S3 endpoint {self.endpoint} did not answer within {self.read_timeout:g} s to {where}; "
                "it may be overloaded: retry, or raise read_timeout"
            )
        if isinstance(cause, HTTPClientError):
            return StoreUnreachableError(f"the connection to {self.endpoint} broke while trying to {where}; retry")
        if isinstance(cause, ClientError):
            return self._client_error(cause, doing, where)
        return StoreError(f"S3 client error while trying to {where}: {type(cause).__name__}")

    def _client_error(self, err: ClientError, doing: str, where: str) -> StoreError:
        code, status = _code(err), _status(err)
        if code in _REJECTED_CREDENTIALS:
            return StoreCredentialsError(
                f"the S3 credentials were rejected ({code}) when trying to {where}; check AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, the AWS profile or the credentials block"
            )
        if code in _NOT_ALLOWED:
            return StoreCredentialsError(
                f"access denied ({code}) when trying to {where}: the credentials were rejected or may not do this; "
                f"use credentials allowed to read, write, list and delete in s3://{self.bucket}/{self.prefix}"
            )
        if code == "NoSuchBucket":
            return NoSuchBucketError(
                f"the S3 bucket {self.bucket!r} does not exist at {self.endpoint} (trying to {doing}); create it "
                "or fix the store URL"
            )
        message = str(err.response.get("Error", {}).get("Message", ""))[:200]
        hint = _SERVER_FAULT_HINT if status is not None and status >= 500 else ""
        return StoreError(f"S3 refused to {where}: {code or 'error'} (HTTP {status}) {message}".rstrip() + hint)

    # --------------------------------------------------------------------------------------------- objects

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._w(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data)
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, f"write {key!r}") from None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Conditional create (``If-None-Match: *``): False if ``key`` exists.

        A 409 ConditionalRequestConflict (a concurrent write in flight) is retried. If a retried request's
        first attempt had landed, the retry answers 412 and this returns False although our bytes are there:
        callers compare what they find (the commit protocol compares sha256).
        """
        full = self._w(key)
        for attempt in range(self.max_attempts):
            try:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
                return True
            except ClientError as err:
                if _status(err) == 412 or _code(err) == "PreconditionFailed":
                    return False
                if not _is_conflict(err) or attempt + 1 == self.max_attempts:
                    raise self._error(err, f"create {key!r}") from None
            except BotoCoreError as err:
                raise self._error(err, f"create {key!r}") from None
            time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    def get_bytes(self, key: str) -> bytes:
        full = self._k(key)
        for attempt in range(self.max_attempts):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
            except ClientError as err:
                if _code(err) in _MISSING:
                    raise MissingArtefactError(f"{key!r} is not in {self.url}") from None
                raise self._error(err, f"read {key!r}") from None
            except _STREAM_ERRORS as err:
                if attempt + 1 == self.max_attempts:
                    raise self._error(err, f"read {key!r}") from None
                log.debug("reading %s broke (%s); retrying", key, type(err).__name__)
            except BotoCoreError as err:
                raise self._error(err, f"read {key!r}") from None
            time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file (multipart above ``multipart_threshold``; ETags are not MD5s then: never used)."""
        path, full = Path(path), self._w(key)
        if not path.is_file():
            raise StoreError(f"cannot store {key!r}: the local file {path} does not exist")
        try:
            self.client.upload_file(str(path), self.bucket, full, Config=self.transfer)
        except (ClientError, BotoCoreError, Boto3Error) as err:
            raise self._error(err, f"upload {key!r}") from None
        except OSError as err:
            raise StoreError(f"cannot read {path} to upload it as {key!r}: {err.strerror or err}") from None

    def get_file(self, key: str, path: Path) -> None:
        """Download to ``path`` (s3transfer writes a temp file and renames it, so ``path`` is never partial)."""
        path, full = Path(path), self._k(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, full, str(path), Config=self.transfer)
        except (ClientError, BotoCoreError, Boto3Error) as err:
            if isinstance(_underlying(err), ClientError) and _code(_underlying(err)) in _MISSING:
                raise MissingArtefactError(f"{key!r} is not in {self.url}") from None
            raise self._error(err, f"download {key!r}") from None
        except OSError as err:
            raise StoreError(
                f"cannot save {key!r} from {self.url} to {path}: {err.strerror or err}; free space or fix permissions"
            ) from None

    def _head(self, key: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as err:
            # A HEAD answer has no body, so a missing bucket also reads as 404; check_store tells them apart.
            if _code(err) in _MISSING:
                return None
            raise self._error(err, f"inspect {key!r}") from None
        except BotoCoreError as err:
            raise self._error(err, f"inspect {key!r}") from None

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise MissingArtefactError(f"{key!r} is not in {self.url}")
        return int(head["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        full = self.prefix + check_prefix(prefix)
        found: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                found += [o["Key"][len(self.prefix) :] for o in page.get("Contents", []) if _is_object(o["Key"])]
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, f"list {prefix!r}") from None
        return sorted(found)

    def delete(self, key: str) -> None:
        full = self._w(key)  # validated: a key can never reach outside this store's prefix
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full)
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, f"delete {key!r}") from None

    # ------------------------------------------------------------------------------ compare-and-swap (SwapStore)

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """The bytes and the ETag of ``key``."""
        full = self._k(key)
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=full)
            return answer["Body"].read(), str(answer["ETag"])
        except ClientError as err:
            if _code(err) in _MISSING:
                raise MissingArtefactError(f"{key!r} is not in {self.url}") from None
            raise self._error(err, f"read {key!r}") from None
        except BotoCoreError as err:
            raise self._error(err, f"read {key!r}") from None

    def replace_if(self, key: str, data: bytes, tag: str) -> str | None:
        """``PutObject`` with ``If-Match``: the new ETag, or None when ``key`` changed (412) or is gone (404). A
        retried request whose first attempt landed answers 412 too: callers re-read and compare."""
        full = self._w(key)
        try:
            return str(self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfMatch=tag)["ETag"])
        except ClientError as err:
            if _status(err) in (404, 412) or _code(err) in ("PreconditionFailed", *_MISSING) or _is_conflict(err):
                return None
            raise self._error(err, f"replace {key!r}") from None
        except BotoCoreError as err:
            raise self._error(err, f"replace {key!r}") from None

    def delete_if(self, key: str, tag: str) -> bool:
        """``DeleteObject`` with ``If-Match``: False when ``key`` changed or is gone."""
        full = self._w(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full, IfMatch=tag)
            return True
        except ClientError as err:
            if _status(err) in (404, 412) or _code(err) in ("PreconditionFailed", *_MISSING) or _is_conflict(err):
                return False
            raise self._error(err, f"delete {key!r}") from None
        except BotoCoreError as err:
            raise self._error(err, f"delete {key!r}") from None

    # ------------------------------------------------------------------------------------------- bucket

    def check(self) -> None:
        """One LIST of at most one key: proves the endpoint answers, the credentials work and the bucket exists."""
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, "list") from None

    def create_bucket(self) -> None:
        """Create the bucket if it does not exist (for embedded and test servers; production buckets are made by
        whoever owns the account)."""
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as err:
            if _code(err) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._error(err, "create the bucket") from None
        except BotoCoreError as err:
            raise self._error(err, "create the bucket") from None


# ----------------------------------------------------------------------------------------------- helpers

_SHARED_SESSION: boto3.Session | None = None
_SESSION_LOCK = threading.Lock()


def _make_client(
    session: boto3.Session | None,
    access_key: str | None,
    secret_key: str | None,
    session_token: str | None,
    region: str | None,
    endpoint_url: str | None,
    config: Config,
) -> Any:
    """An S3 client. With explicit keys it comes from one shared session (a new session costs ~0.1 s to load
    the service model); without, from a fresh session, so the AWS chain is read now, not when first cached."""
    global _SHARED_SESSION
    if session is None and access_key is None:
        session = boto3.session.Session(region_name=region)
    if session is not None:
        return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
    with _SESSION_LOCK:  # sessions are not thread-safe; the clients they make are
        _SHARED_SESSION = _SHARED_SESSION or boto3.session.Session()
        return _SHARED_SESSION.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=config,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            aws_session_token=session_token,
        )


def _as_prefix(prefix: str) -> str:
    """'' or 'a/b/' (validated like a key, one trailing slash)."""
    stripped = (prefix or "").strip("/")
    return check_key(stripped) + "/" if stripped else ""


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _status(err: ClientError) -> int | None:
    return err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _is_conflict(err: ClientError) -> bool:
    return _status(err) == 409 or _code(err) == "ConditionalRequestConflict"


def _is_object(full_key: str) -> bool:
    """Folder markers ('a/') some servers list are not objects; neither are temp names."""
    return not full_key.endswith("/") and not full_key.rpartition("/")[2].startswith(TEMP_PREFIX)


def _backoff(attempt: int) -> float:
    """Full-jitter exponential backoff, capped at 5 s (AWS's recommendation for retries)."""
    return random.uniform(0, min(5.0, 0.1 * 2**attempt))


def _underlying(err: BaseException) -> BaseException:
    """The botocore error behind boto3's transfer wrappers (S3UploadFailedError, RetriesExceededError)."""
    if isinstance(err, RetriesExceededError) and err.last_exception is not None:
        return _underlying(err.last_exception)
    if isinstance(err, S3UploadFailedError | Boto3Error):
        inner = err.__cause__ or err.__context__
        if isinstance(inner, ClientError | BotoCoreError | Boto3Error):
            return _underlying(inner)
    return err
