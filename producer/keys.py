"""Which object keys are images, and the URI a job carries for them.

Both the backfill lister and the event listeners filter with this, so an upload and a
backfill agree on what gets captioned. The check is a string split, not PurePosixPath: it
runs once per listed object, millions of times in a backfill.
"""

from __future__ import annotations

from captioning.uris import ImageLocation

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif"}
)


def is_image_key(key: str) -> bool:
    name = key.rpartition("/")[2]
    stem, dot, extension = name.rpartition(".")
    return bool(dot and stem) and f".{extension.lower()}" in IMAGE_EXTENSIONS


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def s3_location(bucket: str, key: str) -> ImageLocation:
    return ImageLocation(uri=s3_uri(bucket, key), scheme="s3", bucket=bucket, key=key)
