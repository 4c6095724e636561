"""S3 Inventory reports as listing pages: a bucket of tens of millions of objects, read from its
daily report instead of millions of LIST calls.

`manifest.json` names the source bucket, the format (CSV, gzipped, with the columns in
`fileSchema`; or Parquet) and the data files. Each data file becomes one part of the backfill
(listed by producer/listing.py, in parallel with --list-workers), read as a stream in pages of
1,000 objects. A file's rows are in no promised order, so a part resumes after the row whose key
is its checkpoint's last key. Delete markers and (with versions) non-current rows are skipped;
CSV keys are URL-encoded by S3 and decoded here.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import pyarrow.parquet as pq

from captioning.errors import ConfigError
from captioning.storage import ListedObject, S3Store
from captioning.uris import ImageLocation
from producer.keys import s3_location

PAGE_SIZE = 1000
PARQUET_COLUMNS = {
    "key": "key", "e_tag": "etag", "size": "size", "last_modified_date": "last_modified",
    "is_latest": "is_latest", "is_delete_marker": "is_delete_marker",
}
CSV_COLUMNS = {
    "Key": "key", "ETag": "etag", "Size": "size", "LastModifiedDate": "last_modified",
    "IsLatest": "is_latest", "IsDeleteMarker": "is_delete_marker",
}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Manifest:
    location: ImageLocation
    source_bucket: str
    file_format: str
    columns: tuple[str, ...]
    """CSV only: our names for the columns of `fileSchema` ('' for the ones we ignore)."""
    files: tuple[ImageLocation, ...]


def parse_manifest(location: ImageLocation, raw: bytes) -> Manifest:
    try:
        manifest = json.loads(raw)
        destination = str(manifest["destinationBucket"]).removeprefix("arn:aws:s3:::")
        file_format = str(manifest["fileFormat"]).upper()
        files = tuple(
            s3_location(destination, str(entry["key"]))
            for entry in manifest["files"]
        )
        source_bucket = str(manifest["sourceBucket"])
        schema = str(manifest.get("fileSchema", ""))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{location.uri} is not an S3 Inventory manifest.json: {exc}") from exc
    if file_format not in ("CSV", "PARQUET"):
        raise ConfigError(f"inventory format {file_format} is not supported: use CSV or Parquet")
    columns = tuple(CSV_COLUMNS.get(name.strip(), "") for name in schema.split(","))
    if file_format == "CSV" and "key" not in columns:
        raise ConfigError(f"the inventory's fileSchema has no Key column: {schema!r}")
    return Manifest(location, source_bucket, file_format, columns, files)


def read_manifest(store: S3Store, location: ImageLocation) -> Manifest:
    return parse_manifest(location, store.stream(location.bucket, location.key).read())


def file_pages(
    store: S3Store, manifest: Manifest, data_file: ImageLocation, prefix: str, start_after: str
) -> Iterator[list[ListedObject]]:
    """One inventory data file as pages of objects under `prefix`, after `start_after`."""
    if manifest.file_format == "CSV":
        objects = _csv_objects(store, manifest.columns, data_file)
    else:
        objects = _parquet_objects(store, data_file)
    page: list[ListedObject] = []
    waiting = bool(start_after)
    for obj in objects:
        if waiting:
            waiting = obj.key != start_after
            continue
        if not obj.key.startswith(prefix):
            continue
        page.append(obj)
        if len(page) == PAGE_SIZE:
            yield page
            page = []
    if page:
        yield page


def _csv_objects(
    store: S3Store, columns: tuple[str, ...], data_file: ImageLocation
) -> Iterator[ListedObject]:
    """The current, non-deleted objects of a CSV file, read as a stream (gunzipped)."""
    at = {name: i for i, name in enumerate(columns) if name}
    key, etag, size, modified = (at.get(n) for n in ("key", "etag", "size", "last_modified"))
    latest, deleted = at.get("is_latest"), at.get("is_delete_marker")
    body = store.stream(data_file.bucket, data_file.key)
    raw: Any = gzip.GzipFile(fileobj=body) if data_file.key.endswith(".gz") else body
    with io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
        for row in csv.reader(text):
            if (deleted is not None and row[deleted] == "true") or (
                latest is not None and row[latest] == "false"
            ):
                continue
            yield ListedObject(
                key=unquote(row[key]),  # type: ignore[index]
                etag=row[etag].strip('"') if etag is not None else "",
                size=int(row[size] or 0) if size is not None else 0,
                last_modified=_moment(row[modified]) if modified is not None else EPOCH,
            )


def _parquet_objects(store: S3Store, data_file: ImageLocation) -> Iterator[ListedObject]:
    """Parquet needs random access: the file is spooled to local disk, then read by batches."""
    with tempfile.TemporaryFile() as spool:
        store.download(data_file.bucket, data_file.key, spool)
        spool.seek(0)
        parquet = pq.ParquetFile(spool)
        present = [name for name in PARQUET_COLUMNS if name in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=PAGE_SIZE, columns=present):
            values = {PARQUET_COLUMNS[name]: batch.column(name).to_pylist() for name in present}
            count = batch.num_rows
            nothing = [None] * count
            for key, etag, size, modified, latest, deleted in zip(
                values["key"], *(values.get(name, nothing) for name in (
                    "etag", "size", "last_modified", "is_latest", "is_delete_marker")),
                strict=True,
            ):
                if deleted is True or latest is False:
                    continue
                yield ListedObject(
                    key=key, etag=(etag or "").strip('"'), size=size or 0,
                    last_modified=_moment(modified) if modified is not None else EPOCH,
                )


def _moment(value: str | datetime) -> datetime:
    """A timestamp as an aware datetime; an empty CSV cell is the epoch."""
    if not value:
        return EPOCH
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
