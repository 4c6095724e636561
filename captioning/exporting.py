"""`captioner export`: the results table as a dataset file, or as caption files beside images.

Rows stream from a server-side cursor in chunks, and each chunk is written (a Parquet row
group, or lines of JSONL/CSV) before the next is read, so memory stays flat for any table
size. A file bound for S3 is written to a local temporary file and uploaded in parts, so the
upload is constant-memory too. `txt` writes `<image name>.txt` per captioned image, the form
image-generator training tools (kohya-ss, diffusers' ImageFolder captions) read.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, Literal

import pyarrow.parquet as pq
from sqlalchemy import Select, func, select

from captioning.errors import ConfigError
from captioning.parquet import ROW_SCHEMA, rows_table
from captioning.results import CaptionRow, ResultsStore, Status, captions
from captioning.storage import S3Store
from captioning.uris import ImageLocation, parse_prefix

Format = Literal["parquet", "jsonl", "csv", "txt"]
CHUNK_ROWS = 50_000
ROW_FIELDS = [f.name for f in fields(CaptionRow)]


@dataclass(frozen=True)
class Selection:
    """Which rows to export; every filter is optional."""

    prefix: str | None = None
    model: str | None = None
    status: Status | None = None
    since: datetime | None = None

    def where(self, query: Select) -> Select:  # type: ignore[type-arg]
        if self.prefix:
            query = query.where(captions.c.uri.startswith(self.prefix, autoescape=True))
        if self.model:
            query = query.where(captions.c.model == self.model)
        if self.status:
            query = query.where(captions.c.status == self.status)
        if self.since:
            query = query.where(captions.c.finished_at >= self.since)
        return query


def count(store: ResultsStore, selection: Selection) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(selection.where(select(func.count()).select_from(captions)))
                   .scalar_one())


def chunks(
    store: ResultsStore, selection: Selection, size: int = CHUNK_ROWS
) -> Iterator[list[CaptionRow]]:
    """Rows in uri order, `size` at a time, from a server-side cursor (PostgreSQL)."""
    query = selection.where(select(*(captions.c[name] for name in ROW_FIELDS)))
    with store.engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=size).execute(
            query.order_by(captions.c.uri)
        )
        for partition in result.partitions(size):
            yield [CaptionRow(*row) for row in partition]  # selected in field order


def export(
    store: ResultsStore,
    selection: Selection,
    fmt: Format,
    output: str,
    *,
    s3: Callable[[], S3Store],
    on_rows: Callable[[int], None] = lambda _n: None,
) -> int:
    """Write the selected rows to `output` (a path, or s3://bucket/key; for txt a folder, an
    s3:// prefix, or '' for beside each local image). Returns the rows written."""
    if fmt == "txt":
        return write_caption_files(chunks(store, selection), output, selection.prefix or "",
                                   s3, on_rows)
    if not output:
        raise ConfigError(f"--format {fmt} needs --output PATH or s3://bucket/key")
    target = destination(output)
    rows = Tally(chunks(store, selection), on_rows)
    if target.scheme == "file":
        with open(target.key, "wb") as sink:
            WRITERS[fmt](rows, sink)
        return rows.count
    with tempfile.TemporaryFile() as spool:
        WRITERS[fmt](rows, spool)
        spool.seek(0)
        s3().upload(target.bucket, target.key, spool)
    return rows.count


def write_parquet(rows: Iterable[list[CaptionRow]], sink: IO[bytes]) -> None:
    with pq.ParquetWriter(sink, ROW_SCHEMA, compression="zstd") as writer:
        for chunk in rows:
            writer.write_table(rows_table(chunk), row_group_size=len(chunk))


def write_jsonl(rows: Iterable[list[CaptionRow]], sink: IO[bytes]) -> None:
    for chunk in rows:
        lines = (json.dumps(row.to_json(), ensure_ascii=False) + "\n" for row in chunk)
        sink.write("".join(lines).encode())


def write_csv(rows: Iterable[list[CaptionRow]], sink: IO[bytes]) -> None:
    text = io.TextIOWrapper(sink, encoding="utf-8", newline="", write_through=True)
    out = csv.DictWriter(text, fieldnames=ROW_FIELDS)
    out.writeheader()
    for chunk in rows:
        out.writerows(row.to_json() for row in chunk)
    text.detach()


def destination(output: str) -> ImageLocation:
    """`s3://bucket/key`, `file:///path` or a plain local path."""
    if output.startswith(("s3://", "file://")):
        return parse_prefix(output)
    path = str(Path(output).resolve())
    return ImageLocation(uri=Path(path).as_uri(), scheme="file", bucket="", key=path)


WRITERS = {"parquet": write_parquet, "jsonl": write_jsonl, "csv": write_csv}


class Tally:
    """Counts the rows of the chunks passing through, reporting each chunk to `on_rows`."""

    def __init__(self, rows: Iterable[list[CaptionRow]], on_rows: Callable[[int], None]) -> None:
        self._rows = rows
        self._on_rows = on_rows
        self.count = 0

    def __iter__(self) -> Iterator[list[CaptionRow]]:
        for chunk in self._rows:
            yield chunk
            self.count += len(chunk)
            self._on_rows(len(chunk))


def caption_name(row: CaptionRow, strip: str) -> str:
    """`<image name>.txt`, relative: the URI below `strip` (the export's --prefix), or
    `<bucket>/<key>` (the path, for local files) when the URI is not under it."""
    if strip and row.uri.startswith(strip):
        relative = row.uri[len(strip):]
    else:
        relative = f"{row.bucket}/{row.key}" if row.bucket else row.key
    return str(PurePosixPath(relative.lstrip("/")).with_suffix(".txt"))


def write_caption_files(
    rows: Iterator[list[CaptionRow]],
    output: str,
    strip: str,
    s3: Callable[[], S3Store],
    on_rows: Callable[[int], None],
) -> int:
    """One `.txt` per `ok` row: beside local images (no output), in a folder, or in S3."""
    target = destination(output) if output else None
    written = 0
    with ThreadPoolExecutor(16, thread_name_prefix="txt") as pool:
        for chunk in rows:
            ok = [row for row in chunk if row.status == "ok" and row.caption is not None]
            list(pool.map(lambda row: _write_caption(row, target, strip, s3), ok))
            written += len(ok)
            on_rows(len(chunk))
    return written


def _write_caption(
    row: CaptionRow, target: ImageLocation | None, strip: str, s3: Callable[[], S3Store]
) -> None:
    text = (row.caption or "").encode()
    if target is None:
        if row.bucket:
            raise ConfigError("caption files beside the images need local images: "
                              "give --output DIR or s3://bucket/prefix for S3 images")
        Path(row.key).with_suffix(".txt").write_bytes(text)
        return
    name = caption_name(row, strip)
    if target.scheme == "s3":
        key = f"{target.key.rstrip('/')}/{name}".lstrip("/")
        s3().put(target.bucket, key, text, "text/plain; charset=utf-8")
        return
    path = Path(target.key) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)
