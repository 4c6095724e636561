"""Image URIs: parse them and decide, before any I/O, whether they may be read.

Only `s3://bucket/key` and `file:///abs/path` exist. Everything else (http, ftp, gs, bare
paths) is refused, so a message in the queue can never make a worker reach an arbitrary
address such as a cloud metadata endpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from captioning.errors import UriRefused
from captioning.settings import Settings

Scheme = Literal["s3", "file"]

MAX_URI_LENGTH = 2048


@dataclass(frozen=True)
class ImageLocation:
    """Where an image lives. For files, `bucket` is empty and `key` is the absolute path."""

    uri: str
    scheme: Scheme
    bucket: str
    key: str


def parse_uri(uri: str) -> ImageLocation:
    location = parse_prefix(uri)
    if not location.key or (location.scheme == "s3" and location.key.endswith("/")):
        raise UriRefused(f"expected s3://bucket/key, got {uri!r}")
    return location


def parse_prefix(uri: str) -> ImageLocation:
    """`s3://bucket[/prefix]` or `file:///dir`: an object, or where to list or write many."""
    if len(uri) > MAX_URI_LENGTH:
        raise UriRefused(f"URI longer than {MAX_URI_LENGTH} characters")
    if any(ord(ch) < 32 for ch in uri):
        raise UriRefused("URI contains control characters")
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        bucket, key = parts.netloc, uri[len("s3://") + len(parts.netloc) + 1 :]
        if not bucket:
            raise UriRefused(f"expected s3://bucket/key, got {uri!r}")
        return ImageLocation(uri=uri, scheme="s3", bucket=bucket, key=key)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UriRefused(f"file URIs must be local (file:///path), got host {parts.netloc!r}")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise UriRefused(f"file URIs need an absolute path, got {uri!r}")
        return ImageLocation(uri=uri, scheme="file", bucket="", key=path)
    scheme = parts.scheme or "no scheme"
    raise UriRefused(f"scheme {scheme!r} is not allowed: use s3://bucket/key or file:///path")


def file_uri(path: Path) -> str:
    return path.resolve().as_uri()


def check_allowed(location: ImageLocation, settings: Settings) -> None:
    """Raise UriRefused unless the settings' allow-lists admit this location."""
    if location.scheme == "s3":
        if settings.allowed_buckets and location.bucket not in settings.allowed_buckets:
            raise UriRefused(
                f"bucket {location.bucket!r} is not in CAPTIONER_ALLOWED_BUCKETS"
            )
        return
    if not settings.allowed_roots:
        raise UriRefused("file URIs are refused: CAPTIONER_ALLOWED_ROOTS is empty")
    if not _is_under_allowed_root(location.key, settings.allowed_roots):
        raise UriRefused("path is outside CAPTIONER_ALLOWED_ROOTS")


def _is_under_allowed_root(path: str, roots: tuple[Path, ...]) -> bool:
    """Resolve `..` and symlinks first, so neither can step out of a root."""
    real = Path(os.path.realpath(path))
    return any(real == root or root in real.parents for root in roots)


def allowed_location(uri: str, settings: Settings) -> ImageLocation:
    location = parse_uri(uri)
    check_allowed(location, settings)
    return location
