"""Datasets in and out on real PostgreSQL and SeaweedFS: Parquet results per job, content
dedupe, the schema upgrade, exports, S3 Inventory and parallel listing backfills."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pyarrow.fs import S3FileSystem
from sqlalchemy import create_engine, inspect, text

from bench.cost import Prices, Workload, cost
from captioning import metrics
from captioning.errors import ConfigError
from captioning.exporting import Selection, count, export
from captioning.messages import CaptionJob, JobItem
from captioning.parquet import ROW_SCHEMA, job_object_key, model_dir, rows_table
from captioning.results import CaptionRow, ResultsStore
from captioning.settings import Settings
from captioning.storage import S3Store
from tests.conftest import settings_env
from tests.imagefactory import encode, photo_bytes, sample_rgb
from tests.services import SeaweedS3
from workers.context import WorkerContext
from workers.tasks import process_job


@pytest.fixture(scope="module")
def parquet_ctx(settings: Settings, results: ResultsStore) -> Iterator[WorkerContext]:
    """A worker's context writing Parquet results with content dedupe on."""
    configured = settings.model_copy(update={
        "results_uri": f"s3://uploads/parquet-{uuid.uuid4().hex[:8]}",
        "results_format": "parquet", "content_dedupe": True, "device": "cpu",
    })
    context = WorkerContext.create(configured)
    yield context
    context.close()


def upload(s3, prefix: str, files: dict[str, bytes]) -> list[str]:
    for name, data in files.items():
        s3.put_object(Bucket="photos", Key=prefix + name, Body=data)
    return [f"s3://photos/{prefix}{name}" for name in files]


def listed_keys(s3, bucket: str, prefix: str) -> list[str]:
    found = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return [obj["Key"] for obj in found]


def test_a_job_writes_one_parquet_object_that_a_redelivery_overwrites(
    parquet_ctx: WorkerContext, results: ResultsStore, s3, seaweed: SeaweedS3, prefix: str
) -> None:
    photos = photo_bytes()
    uris = upload(s3, prefix, {**photos, "missing-before.jpg": b""})
    s3.delete_object(Bucket="photos", Key=prefix + "missing-before.jpg")
    job = CaptionJob(items=tuple(JobItem(uri=u) for u in uris), model="tiny-random-blip2",
                     source="cli", enqueued_at=1_767_225_600.0)  # 2026-01-01 UTC
    for _delivery in range(2):
        rows = process_job(job, parquet_ctx, "captions.realtime").rows
        parquet_ctx.writer.write(rows)

    root = parquet_ctx.settings.results_uri.removeprefix("s3://uploads/")
    objects = listed_keys(s3, "uploads", root + "/")
    assert objects == [job_object_key(root, rows)]
    assert objects[0].startswith(f"{root}/tiny-random-blip2/2026-01-01/")
    body = s3.get_object(Bucket="uploads", Key=objects[0])["Body"].read()
    table = pq.read_table(io.BytesIO(body))
    assert table.schema.equals(ROW_SCHEMA)
    stored = {row.uri: row for row in results.rows(prefix=f"s3://photos/{prefix}")}
    assert len(table) == len(uris) == len(stored)
    for record in table.to_pylist():
        row = stored[record["uri"]]
        assert record == {**asdict(row), "attempts": 1}, record["uri"]  # the first write's copy
    failed = [r for r in table.to_pylist() if r["status"] == "failed"]
    assert [r["error"].split(":")[0] for r in failed] == ["ObjectMissing"]
    assert failed[0]["content_digest"] is None
    assert all(len(r["content_digest"]) == 64 for r in table.to_pylist() if r["status"] == "ok")

    store = S3FileSystem(endpoint_override=seaweed.endpoint, scheme="http", region="us-east-1")
    day = ds.dataset(f"uploads/{root}/tiny-random-blip2/2026-01-01/", filesystem=store)
    assert sorted(day.to_table().column("uri").to_pylist()) == sorted(uris)


def test_the_same_bytes_under_another_key_copy_the_caption_without_the_model(
    parquet_ctx: WorkerContext, results: ResultsStore, s3, prefix: str
) -> None:
    rocket = photo_bytes()["rocket.jpg"]
    first = upload(s3, prefix, {"a/rocket.jpg": rocket})
    model = "tiny-random-blip2"
    original = process_job(CaptionJob(items=(JobItem(uri=first[0]),), model=model,
                                      source="cli"), parquet_ctx, "captions.realtime").rows
    parquet_ctx.writer.write(original)

    fresh = encode(sample_rgb((40 + len(prefix), 30)).rotate(int(prefix[2:6], 16) % 360), "PNG")
    copies = upload(s3, prefix, {"b/copy.jpg": rocket, "b/fresh.png": fresh})
    batch_sizes = metrics.BATCH_SIZE.labels("caption")
    deduped, to_model = metrics.DEDUPED._value.get(), batch_sizes._sum.get()
    rows = process_job(CaptionJob(items=tuple(JobItem(uri=u) for u in copies), model=model,
                                  source="cli"), parquet_ctx, "captions.realtime").rows
    assert metrics.DEDUPED._value.get() - deduped == 1
    assert batch_sizes._sum.get() - to_model == 1  # only the new image met the model
    assert rows[0].caption == original[0].caption and rows[0].status == "ok"
    assert rows[0].content_digest == original[0].content_digest
    assert rows[1].content_digest != original[0].content_digest
    assert rows[1].status == "ok"


def test_a_copied_caption_keeps_its_scores_and_only_the_same_scorer_copies(
    settings: Settings, results: ResultsStore, s3, prefix: str
) -> None:
    scored = settings.model_copy(update={
        "content_dedupe": True, "device": "cpu", "scorer": "tiny-random-blip2-itm",
    })
    context = WorkerContext.create(scored)
    try:
        # Bytes no other test captions (the session's table is shared).
        unique = encode(sample_rgb((50 + len(prefix), 40)).rotate(int(prefix[2:6], 16) % 360),
                        "PNG")
        uris = upload(s3, prefix, {"a/unique.png": unique, "b/unique.png": unique})
        rows = []
        deduped = metrics.DEDUPED._value.get()
        for uri in uris:
            job = CaptionJob(items=(JobItem(uri=uri),), model="tiny-random-blip2", source="cli")
            rows += process_job(job, context, "captions.realtime").rows
            context.writer.write(rows[-1:])
    finally:
        context.close()
    assert metrics.DEDUPED._value.get() - deduped == 1  # the second was copied, not run

    original, copy = rows
    assert original.match_probability is not None and original.scorer == "tiny-random-blip2-itm"
    assert (copy.caption, copy.scorer, copy.match_probability, copy.itc_cosine) == (
        original.caption, original.scorer, original.match_probability, original.itc_cosine)
    digest = original.content_digest
    assert digest is not None
    assert results.earlier_captions([digest], original.model, original.prompt, "another") == {}


def test_db_upgrade_adds_the_digest_column_to_an_old_table(postgres_url: str) -> None:
    engine = create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    schema = f"old_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = f"{postgres_url}?options=-csearch_path%3D{schema}"
    store = ResultsStore(url)
    with store.engine.begin() as conn:  # the captions table as the previous release made it
        conn.execute(text(
            "CREATE TABLE captions (id varchar(64) PRIMARY KEY, uri text NOT NULL, "
            "bucket text NOT NULL, key text NOT NULL, etag text NOT NULL, version_id text, "
            "model text NOT NULL, prompt text NOT NULL, status varchar(8) NOT NULL, "
            "caption text, error text, width integer, height integer, bytes integer, "
            "attempts integer NOT NULL, enqueued_at timestamptz, "
            "finished_at timestamptz NOT NULL, worker text)"
        ))
        conn.execute(text(
            "INSERT INTO captions VALUES ('x', 's3://b/k', 'b', 'k', '', NULL, 'm', '', 'ok', "
            "'a cat', NULL, 1, 1, 1, 1, NULL, now(), NULL)"
        ))
    store.create_schema()
    store.create_schema()  # idempotent
    with store.engine.connect() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("captions")}
        indexes = {i["name"] for i in inspect(conn).get_indexes("captions")}
    assert "content_digest" in columns and "ix_captions_digest" in indexes
    (old,) = store.rows()
    assert (old.caption, old.content_digest) == ("a cat", None)
    store.dispose()
    engine.dispose()


def test_model_dir_and_object_key_are_safe_and_stable() -> None:
    assert model_dir("Salesforce/blip2-opt-2.7b") == "Salesforce--blip2-opt-2.7b"
    assert model_dir("../odd model?") == "_--odd_model_"
    assert model_dir("..") == "_"
    when = datetime(2026, 3, 4, 23, 59, tzinfo=UTC)
    row = CaptionRow(uri="s3://b/k.jpg", bucket="b", key="k.jpg", etag="", version_id=None,
                     model="org/m", prompt="", status="ok", caption="c", error=None, width=1,
                     height=1, bytes=1, enqueued_at=when, finished_at=datetime.now(UTC),
                     worker="w")
    key = job_object_key("/out/", [row])
    assert key.startswith("out/org--m/2026-03-04/") and key.endswith(".parquet")
    assert job_object_key("out", [replace(row, finished_at=when, attempts=3)]) == key
    assert job_object_key("out", [replace(row, uri="s3://b/other.jpg")]) != key


def synthetic_rows(prefix: str, count: int, local: Path | None = None) -> list[CaptionRow]:
    """Rows as workers write them: ok and failed, two models, S3 or local images."""
    when = datetime(2026, 5, 1, tzinfo=UTC)
    rows = []
    for n in range(count):
        uri = (local / f"img{n}.jpg").as_uri() if local else f"s3://photos/{prefix}d/{n:03d}.jpg"
        ok = n % 4 != 3
        rows.append(CaptionRow(
            uri=uri, bucket="" if local else "photos",
            key=str(local / f"img{n}.jpg") if local else f"{prefix}d/{n:03d}.jpg",
            etag=f"e{n}", version_id=None, model="m1" if n % 5 else "m2", prompt="",
            status="ok" if ok else "failed", caption=f"caption {n}, «quoted»" if ok else None,
            error=None if ok else "ObjectMissing: gone", width=n, height=1, bytes=10,
            enqueued_at=when, finished_at=when + timedelta(minutes=n), worker="w",
            content_digest=f"{n:064x}",
        ))
    return rows


def test_export_streams_parquet_jsonl_and_csv_locally_and_to_s3_with_filters(
    results: ResultsStore, s3, settings: Settings, prefix: str, tmp_path: Path
) -> None:
    rows = synthetic_rows(prefix, 40)
    results.upsert(rows)
    everything = Selection(prefix=f"s3://photos/{prefix}")
    assert count(results, everything) == 40
    store = lambda: S3Store(settings)  # noqa: E731

    seen: list[int] = []
    written = export(results, everything, "parquet", str(tmp_path / "all.parquet"), s3=store,
                     on_rows=seen.append)
    assert written == sum(seen) == 40
    table = pq.read_table(tmp_path / "all.parquet")
    assert table.to_pylist() == [asdict(row) for row in sorted(rows, key=lambda r: r.uri)]

    picked = Selection(prefix=f"s3://photos/{prefix}", model="m1", status="ok",
                       since=datetime(2026, 5, 1, 0, 10, tzinfo=UTC))
    expected = [r for r in rows if r.model == "m1" and r.status == "ok"
                and r.finished_at >= picked.since]
    export(results, picked, "jsonl", f"s3://uploads/{prefix}export.jsonl", s3=store)
    body = s3.get_object(Bucket="uploads", Key=f"{prefix}export.jsonl")["Body"].read()
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert lines == [row.to_json() for row in expected]

    export(results, picked, "csv", str(tmp_path / "picked.csv"), s3=store)
    with open(tmp_path / "picked.csv", newline="", encoding="utf-8") as handle:
        records = list(csv.DictReader(handle))
    assert [(r["uri"], r["caption"]) for r in records] == [(r.uri, r.caption) for r in expected]

    export(results, everything, "parquet", f"s3://uploads/{prefix}all.parquet", s3=store)
    body = s3.get_object(Bucket="uploads", Key=f"{prefix}all.parquet")["Body"].read()
    assert pq.read_table(io.BytesIO(body)).equals(table)


def test_export_txt_writes_caption_files_beside_local_images_and_under_a_prefix(
    results: ResultsStore, s3, settings: Settings, prefix: str, local_root: Path
) -> None:
    folder = local_root / prefix.strip("/")
    folder.mkdir()
    local = synthetic_rows(prefix, 8, local=folder)
    remote = synthetic_rows(prefix, 8)
    results.upsert(local + remote)
    store = lambda: S3Store(settings)  # noqa: E731

    export(results, Selection(prefix=folder.as_uri()), "txt", "", s3=store)
    assert sorted(p.name for p in folder.glob("*.txt")) == sorted(
        f"img{r.width}.txt" for r in local if r.status == "ok"
    )
    assert (folder / "img1.txt").read_text() == "caption 1, «quoted»"

    written = export(results, Selection(prefix=f"s3://photos/{prefix}"), "txt",
                     f"s3://uploads/{prefix}txt/", s3=store)
    assert written == 6
    keys = sorted(listed_keys(s3, "uploads", f"{prefix}txt/"))
    assert keys == sorted(f"{prefix}txt/d/{r.width:03d}.txt" for r in remote if r.status == "ok")
    body = s3.get_object(Bucket="uploads", Key=f"{prefix}txt/d/002.txt")["Body"].read()
    assert body.decode() == "caption 2, «quoted»"
    with pytest.raises(ConfigError, match="beside the images need local images"):
        export(results, Selection(prefix=f"s3://photos/{prefix}"), "txt", "", s3=store)


def test_export_command_in_a_fresh_process(
    results: ResultsStore, settings: Settings, prefix: str, tmp_path: Path
) -> None:
    rows = synthetic_rows(prefix, 12)
    results.upsert(rows)
    out = tmp_path / "ok.parquet"
    done = subprocess.run(
        [sys.executable, "-m", "cli", "export", "--format", "parquet", "-o", str(out),
         "--prefix", f"s3://photos/{prefix}", "--status", "ok", "--model", "m1"],
        env=settings_env(settings), capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    expected = sorted(r.uri for r in rows if r.status == "ok" and r.model == "m1")
    assert f"exported {len(expected)} rows" in done.stdout
    assert pq.read_table(out).column("uri").to_pylist() == expected


def test_cost_model_counts_a_put_per_image_for_sidecars_and_per_job_for_parquet() -> None:
    work = Workload(images=1_000_000, images_per_second=300, images_per_job=32,
                    redis_bytes_per_image=94, listed=True)
    sidecar, parquet = cost(work, "sidecar"), cost(work, "parquet")
    assert (sidecar.puts, parquet.puts) == (1_000_000, 31_250)
    assert sidecar.lists == parquet.lists == 1000 and sidecar.gets == 1_000_000
    assert cost(replace(work, listed=False), "parquet").lists == 0
    prices = Prices(gpu_hour=3.0, put_per_1000=0.005, list_per_1000=0.005, get_per_1000=0.0004)
    assert sidecar.dollars(prices)["PUT"] == pytest.approx(5.0)
    assert sidecar.dollars(prices)["GPU"] == pytest.approx(1_000_000 / 300 / 3600 * 3.0)
    assert parquet.output_bytes < sidecar.output_bytes


def test_compact_form_carries_kinds_and_parquet_keeps_tags() -> None:
    job = CaptionJob(items=(JobItem(uri="s3://b/d/a.jpg", etag="e"),),
                     kinds={"caption": "m", "tags": "t"}, source="cli")
    message = json.loads(json.dumps(job.to_message()))
    assert "model" not in message and message["kinds"] == {"caption": "m", "tags": "t"}
    assert CaptionJob.from_message(message) == job
    when = datetime(2026, 1, 1, tzinfo=UTC)
    tagged = CaptionRow(uri="s3://b/d/a.jpg", bucket="b", key="d/a.jpg", etag="e",
                        version_id=None, model="t", prompt="", status="ok", caption="cat",
                        error=None, width=1, height=1, bytes=1, enqueued_at=when,
                        finished_at=when, worker="w", kind="tags",
                        tags={"general": {"cat": 0.9}, "rating": {"general": 0.8}})
    (record,) = rows_table([tagged]).to_pylist()
    assert {k: dict(v) for k, v in record["tags"]} == tagged.tags
