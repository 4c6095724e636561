"""`db upgrade` adds the score columns to a table an older release created, rows untouched."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text, inspect

from captioning.parquet import parquet_bytes
from captioning.results import CaptionRow, ResultsStore, captions
from cli.results import format_table, write_rows

SCORE_COLUMNS = {"match_probability", "itc_cosine", "scorer", "candidates"}
#: The columns added since the first release: the scores, the kinds' and the digest.
NEW_COLUMNS = SCORE_COLUMNS | {"kind", "tags", "content_digest"}


def old_table(metadata: MetaData) -> Table:
    """The captions table before scores: the columns of the first release."""
    return Table(
        "captions", metadata,
        Column("id", String(64), primary_key=True), Column("uri", Text, nullable=False),
        Column("bucket", Text, nullable=False), Column("key", Text, nullable=False),
        Column("etag", Text, nullable=False), Column("version_id", Text),
        Column("model", Text, nullable=False), Column("prompt", Text, nullable=False),
        Column("status", String(8), nullable=False), Column("caption", Text),
        Column("error", Text), Column("width", Integer), Column("height", Integer),
        Column("bytes", Integer), Column("attempts", Integer, nullable=False),
        Column("enqueued_at", DateTime(timezone=True)),
        Column("finished_at", DateTime(timezone=True), nullable=False), Column("worker", Text),
    )


def row(uri: str, **scores: object) -> CaptionRow:
    return CaptionRow(
        uri=uri, bucket="b", key=uri.rsplit("/", 1)[-1], etag="e", version_id=None,
        model="m", prompt="", status="ok", caption="a cat", error=None, width=1, height=1,
        bytes=1, enqueued_at=None, finished_at=datetime(2026, 1, 1, tzinfo=UTC), worker="w",
        **scores,  # type: ignore[arg-type]
    )


def essence(found: CaptionRow) -> CaptionRow:
    """The row without its timestamp (SQLite gives it back without a time zone)."""
    return replace(found, finished_at=datetime(2026, 1, 1, tzinfo=UTC))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    url: str = request.getfixturevalue("postgres_url")
    store = ResultsStore(url)
    captions.drop(store.engine, checkfirst=True)
    store.dispose()
    return url


def test_upgrade_adds_score_columns_and_keeps_old_rows(database_url: str) -> None:
    store = ResultsStore(database_url)
    metadata = MetaData()
    table = old_table(metadata)
    metadata.create_all(store.engine)
    old = row("s3://b/old.jpg")
    with store.engine.begin() as conn:
        values = {k: v for k, v in old.__dict__.items() if k not in NEW_COLUMNS}
        conn.execute(table.insert().values(id=old.row_id, **values))

    assert set(store.create_schema()) == NEW_COLUMNS
    assert store.create_schema() == []  # twice is fine: nothing left to add

    columns = {c["name"] for c in inspect(store.engine).get_columns("captions")}
    assert columns >= SCORE_COLUMNS
    assert [essence(r) for r in store.rows()] == [essence(old)]
    candidates = [{"caption": "a cat", "match_probability": 0.9, "itc_cosine": 0.3}]
    new = row("s3://b/new.jpg", match_probability=0.9, itc_cosine=0.3, scorer="itm",
              candidates=candidates)
    low = row("s3://b/low.jpg", match_probability=0.1, itc_cosine=0.0, scorer="itm")
    store.upsert([new, low])
    assert [essence(r) for r in store.rows(min_score=0.5)] == [essence(new)]
    assert [r.uri for r in store.rows()] == ["s3://b/low.jpg", "s3://b/new.jpg", "s3://b/old.jpg"]
    store.dispose()


def test_results_output_shows_scores_and_candidates() -> None:
    candidates = [{"text": "a cat", "match_probability": 0.9, "itc_cosine": 0.3}]
    rows = [row("s3://b/new.jpg", match_probability=0.9, itc_cosine=0.3, scorer="itm",
                candidates=candidates), row("s3://b/old.jpg")]
    table = format_table([r.to_json() for r in rows])
    assert table.splitlines()[0].split() == [
        "status", "kind", "uri", "score", "caption", "/", "error"
    ]
    assert "0.900" in table.splitlines()[2] and " - " in table.splitlines()[3]
    assert "score" not in format_table([rows[1].to_json()])
    out = io.StringIO()
    write_rows(rows, "csv", out)
    records = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert json.loads(records[0]["candidates"]) == candidates and records[1]["candidates"] == ""


def test_parquet_holds_scores_and_candidates() -> None:
    candidates = [{"text": "a cat", "match_probability": 0.9, "itc_cosine": 0.3},
                  {"text": "a dog", "match_probability": 0.2, "itc_cosine": 0.1}]
    rows = [row("s3://b/new.jpg", match_probability=0.9, itc_cosine=0.3, scorer="itm",
                candidates=candidates), row("s3://b/old.jpg")]
    table = pq.read_table(io.BytesIO(parquet_bytes(rows))).to_pylist()
    assert table[0]["candidates"] == candidates and table[0]["scorer"] == "itm"
    assert table[0]["match_probability"] == 0.9
    assert table[1]["candidates"] is None and table[1]["match_probability"] is None
