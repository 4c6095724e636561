"""Object store access: S3 (any S3-compatible endpoint) and local files, behind one interface.

Reads are size-capped before the body is downloaded: S3 GETs ask for a byte range one past
the cap, so an oversized object is never transferred in full. botocore and OS errors are
mapped to ours here, at the boundary: a missing object is the image's problem (a `failed`
row), a timeout or 5xx is the infrastructure's (retried).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from stat import S_ISREG
from typing import IO, Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from captioning.errors import (
    AccessDenied,
    CaptionerError,
    ImageTooLarge,
    ObjectMissing,
    StoreCredentialsError,
    StoreUnavailable,
)
from captioning.settings import Settings
from captioning.uris import ImageLocation

MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "404", "NotFound"}
DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
REFUSED_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "AuthorizationHeaderMalformed",
}
CREDENTIALS_HELP = (
    "give boto3 credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
    "or a role (IRSA)"
)


@dataclass(frozen=True)
class StoredObject:
    data: bytes
    etag: str
    version_id: str | None


@dataclass(frozen=True)
class ListedObject:
    key: str
    etag: str
    size: int
    last_modified: datetime


class ObjectStore(Protocol):
    def get(
        self, location: ImageLocation, *, max_bytes: int, version_id: str | None = None
    ) -> StoredObject: ...

    def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None: ...


def clean_etag(etag: str | None) -> str:
    return (etag or "").strip('"')


def too_large(size: int, max_bytes: int, etag: str) -> ImageTooLarge:
    return ImageTooLarge(
        f"object is {size:,} bytes, over the {max_bytes:,}-byte limit", etag=etag
    )


def file_etag(stat: os.stat_result) -> str:
    """Files have no ETag: modification time and size identify a version well enough."""
    return f"{stat.st_mtime_ns:x}-{stat.st_size:x}"


#: Image reads make one attempt each: workers/fetch.py is their only retry layer. With
#: botocore's retries nested inside it, an outage cost 3 x 4 GETs per image per job attempt.
READ_RETRIES = {"total_max_attempts": 1, "mode": "standard"}
#: Listings and sidecar PUTs have no retry loop of their own: botocore's standard mode
#: retries throttling, 5xx and connection errors, 3 attempts in all.
OTHER_RETRIES = {"total_max_attempts": 3, "mode": "standard"}


class S3Store:
    """boto3 S3 clients: one for image reads, pooled for many GETs in flight and never
    retried here, and one for listings and sidecar writes, retried by botocore."""

    def __init__(self, settings: Settings) -> None:
        def client(retries: dict[str, Any], pool: int) -> Any:
            config = Config(
                retries=retries,
                max_pool_connections=pool,
                connect_timeout=5,
                read_timeout=30,
                s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
            )
            return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)

        self._reads = client(READ_RETRIES, max(10, settings.fetch_concurrency * 2))
        self._others = client(OTHER_RETRIES, 10)

    def get(
        self, location: ImageLocation, *, max_bytes: int, version_id: str | None = None
    ) -> StoredObject:
        params: dict[str, str] = {
            "Bucket": location.bucket,
            "Key": location.key,
            "Range": f"bytes=0-{max_bytes}",
        }
        if version_id:
            params["VersionId"] = version_id
        with _s3_errors(location.uri):
            try:
                response = self._reads.get_object(**params)
            except ClientError as exc:
                if _error_code(exc) != "InvalidRange":
                    raise
                return self._empty_object(location, version_id)
            total = _total_size(response)
            etag = clean_etag(response.get("ETag"))
            body = response["Body"]
            try:
                if total > max_bytes:
                    raise too_large(total, max_bytes, etag)
                data = body.read(max_bytes + 1)
            finally:
                body.close()
        if len(data) > max_bytes:
            raise too_large(len(data), max_bytes, etag)
        return StoredObject(data=data, etag=etag, version_id=response.get("VersionId"))

    def _empty_object(self, location: ImageLocation, version_id: str | None) -> StoredObject:
        """A Range GET of a zero-byte object answers 416; HEAD still gives its identity."""
        params = {"Bucket": location.bucket, "Key": location.key}
        if version_id:
            params["VersionId"] = version_id
        head = self._reads.head_object(**params)
        return StoredObject(
            data=b"", etag=clean_etag(head.get("ETag")), version_id=head.get("VersionId")
        )

    def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        with _s3_errors(f"s3://{bucket}/{key}"):
            self._others.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)

    def list(
        self, bucket: str, prefix: str, start_after: str = "", delimiter: str = ""
    ) -> Iterator[list[ListedObject]]:
        """Yield one page (up to 1,000 objects) at a time, in key order; with a delimiter,
        only the objects directly under the prefix."""
        params: dict[str, str] = {"Bucket": bucket, "Prefix": prefix}
        if delimiter:
            params["Delimiter"] = delimiter
        if start_after:
            params["StartAfter"] = start_after
        paginator = self._others.get_paginator("list_objects_v2")
        with _s3_errors(f"s3://{bucket}/{prefix}"):
            for page in paginator.paginate(**params):
                yield [
                    ListedObject(
                        key=obj["Key"],
                        etag=clean_etag(obj.get("ETag")),
                        size=int(obj.get("Size", 0)),
                        last_modified=obj["LastModified"],
                    )
                    for obj in page.get("Contents", [])
                ]

    def list_direct(
        self, bucket: str, prefix: str, start_after: str = ""
    ) -> Iterator[list[ListedObject]]:
        return self.list(bucket, prefix, start_after, delimiter="/")

    def common_prefixes(self, bucket: str, prefix: str) -> tuple[list[str], bool]:
        """The sub-prefixes one `/` below `prefix`, and whether objects lie directly in it."""
        paginator = self._others.get_paginator("list_objects_v2")
        subs: list[str] = []
        direct = False
        with _s3_errors(f"s3://{bucket}/{prefix}"):
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                subs += [entry["Prefix"] for entry in page.get("CommonPrefixes", [])]
                direct = direct or bool(page.get("Contents"))
        return subs, direct

    def stream(self, bucket: str, key: str) -> Any:
        """The body of a whole object as a readable stream (reports, manifests), not capped."""
        with _s3_errors(f"s3://{bucket}/{key}"):
            return self._others.get_object(Bucket=bucket, Key=key)["Body"]

    def download(self, bucket: str, key: str, sink: IO[bytes]) -> None:
        """Copy an object into a file, in parallel ranged parts."""
        with _s3_errors(f"s3://{bucket}/{key}"):
            self._others.download_fileobj(bucket, key, sink)

    def upload(self, bucket: str, key: str, source: IO[bytes]) -> None:
        """Store a file of any size as one object (multipart above 8 MiB)."""
        with _s3_errors(f"s3://{bucket}/{key}"):
            self._others.upload_fileobj(source, bucket, key)


class FileStore:
    """Local files; the allow-list check (roots, symlinks) happens before we get here."""

    def get(
        self, location: ImageLocation, *, max_bytes: int, version_id: str | None = None
    ) -> StoredObject:
        try:
            # O_NONBLOCK: opening a FIFO must not hang the worker waiting for a writer.
            fd = os.open(location.key, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(fd, "rb") as handle:
                stat = os.fstat(handle.fileno())
                if not S_ISREG(stat.st_mode):
                    raise ObjectMissing("not a regular file (device, FIFO or socket)")
                if stat.st_size > max_bytes:
                    raise too_large(stat.st_size, max_bytes, file_etag(stat))
                data = handle.read(max_bytes + 1)
        except FileNotFoundError as exc:
            raise ObjectMissing("no such file") from exc
        except IsADirectoryError as exc:
            raise ObjectMissing("path is a directory, not a file") from exc
        except PermissionError as exc:
            raise AccessDenied("permission denied reading the file") from exc
        except OSError as exc:
            raise ObjectMissing(f"cannot read file: {exc.strerror}") from exc
        if len(data) > max_bytes:
            raise too_large(len(data), max_bytes, file_etag(stat))
        return StoredObject(
            data=data, etag=file_etag(stat), version_id=None
        )

    def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        """Write atomically (temp file + rename) so readers never see half a sidecar."""
        target = Path(bucket or "/") / key.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, target)


class Stores:
    """One store per scheme, created on first use and shared by every fetch thread."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._s3: S3Store | None = None
        self._files = FileStore()

    @property
    def s3(self) -> S3Store:
        if self._s3 is None:
            self._s3 = S3Store(self._settings)
        return self._s3

    def for_location(self, location: ImageLocation) -> ObjectStore:
        return self.s3 if location.scheme == "s3" else self._files


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _status_code(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


def _total_size(response: dict[str, Any]) -> int:
    content_range = response.get("ContentRange")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return int(response.get("ContentLength", 0))


@contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """Map botocore errors to ours: missing/denied belong to the image, the rest is transient."""
    try:
        yield
    except CaptionerError:
        raise
    except ClientError as exc:
        code = _error_code(exc)
        if code == "NoSuchBucket":
            bucket = what.removeprefix("s3://").split("/", 1)[0]
            raise ObjectMissing(f"no such bucket ({code}): {bucket!r} does not exist") from exc
        if code in MISSING_CODES:
            raise ObjectMissing(f"no such object ({code})") from exc
        if code in DENIED_CODES:
            raise AccessDenied(f"access denied ({code})") from exc
        if code in REFUSED_CREDENTIAL_CODES:
            raise StoreCredentialsError(
                f"the object store refused our credentials ({code}): {CREDENTIALS_HELP}"
            ) from exc
        raise StoreUnavailable(
            f"object store error {code or _status_code(exc)} for {what}"
        ) from exc
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise StoreCredentialsError(
            f"no usable AWS credentials ({_reason(exc)}): {CREDENTIALS_HELP}"
        ) from exc
    except (BotoCoreError, OSError) as exc:
        raise StoreUnavailable(f"object store unreachable ({_reason(exc)})") from exc


def _reason(exc: BaseException) -> str:
    """The exception's own first line (it names the endpoint), else its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
