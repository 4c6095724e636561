"""Results as Parquet: the schema of a caption row, and one object per job.

The Arrow schema is derived from the CaptionRow dataclass, so every row field (and any field
added to it later) is a column, with the database's nullability. A job's object is named from
its content (the hash of its items, model, prompt and enqueue time), so a redelivered or
retried job overwrites its own object and never adds a second copy; it lives under
`<prefix>/<model>/<YYYY-MM-DD of enqueue>/`, so one prefix per model and day reads directly
with DuckDB, pandas or pyarrow.dataset.
"""

from __future__ import annotations

import hashlib
import io
import re
import types
from collections.abc import Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Literal, Union, get_args, get_origin, get_type_hints

import pyarrow as pa
import pyarrow.parquet as pq

from captioning.results import CaptionRow

ARROW_TYPES: dict[type, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    datetime: pa.timestamp("us", tz="UTC"),
}


#: Columns whose Python type says too little for Arrow: CapFilt's candidates, each
#: `{"text", "match_probability", "itc_cosine"}` (workers/runtimes/base.Candidate).
ARROW_COLUMNS: dict[str, pa.DataType] = {
    "candidates": pa.list_(pa.struct([
        ("text", pa.string()), ("match_probability", pa.float64()), ("itc_cosine", pa.float64()),
    ])),
}


def _arrow_field(name: str, hint: object) -> pa.Field:
    args = get_args(hint)
    nullable = get_origin(hint) in (Union, types.UnionType) and type(None) in args
    if nullable:
        (hint,) = [arg for arg in args if arg is not type(None)]
    arrow_type = ARROW_COLUMNS.get(name) or _arrow_type(name, hint)
    return pa.field(name, arrow_type, nullable=nullable)


def _arrow_type(name: str, hint: object) -> pa.DataType:
    """Scalars by ARROW_TYPES, Literals by their values' type, dicts as Parquet maps."""
    if get_origin(hint) is Literal:
        hint = type(get_args(hint)[0])
    if get_origin(hint) is dict:
        key, value = get_args(hint)
        return pa.map_(_arrow_type(name, key), _arrow_type(name, value))
    if hint not in ARROW_TYPES:
        raise TypeError(f"CaptionRow.{name}: no Parquet type for {hint!r}")
    return ARROW_TYPES[hint]  # type: ignore[index]


def row_schema() -> pa.Schema:
    hints = get_type_hints(CaptionRow)
    return pa.schema([_arrow_field(f.name, hints[f.name]) for f in fields(CaptionRow)])


ROW_SCHEMA = row_schema()


def rows_table(rows: Sequence[CaptionRow]) -> pa.Table:
    columns = {name: [getattr(row, name) for row in rows] for name in ROW_SCHEMA.names}
    return pa.table(columns, schema=ROW_SCHEMA)


def parquet_bytes(rows: Sequence[CaptionRow]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(rows_table(rows), sink, compression="zstd")
    return sink.getvalue()


def model_dir(model: str) -> str:
    """A path segment for a model id: `Salesforce/blip2-opt-2.7b` -> `Salesforce--blip2-opt-2.7b`
    (the Hugging Face cache's convention); anything else unsafe in a key, and leading dots
    (`..` must never climb out of a local results folder), become `_`."""
    return re.sub(r"^\.+|[^A-Za-z0-9._-]", "_", model.replace("/", "--"))


def job_object_key(prefix: str, rows: Sequence[CaptionRow]) -> str:
    """`<prefix>/<model>/<date>/<job>.parquet`, the same for every delivery of one job."""
    first = rows[0]
    digest = hashlib.sha256()
    for part in (first.model, first.prompt, _iso(first.enqueued_at)):
        digest.update(part.encode() + b"\0")
    for row in rows:
        digest.update(f"{row.uri}\0{row.version_id or ''}\n".encode())
    day = (first.enqueued_at or first.finished_at).astimezone(UTC).date().isoformat()
    name = f"{model_dir(first.model)}/{day}/{digest.hexdigest()[:32]}.parquet"
    return f"{prefix.strip('/')}/{name}".lstrip("/")


def _iso(moment: datetime | None) -> str:
    return moment.isoformat() if moment else ""
