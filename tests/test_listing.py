"""Backfill inputs on real SeaweedFS and Redis: pipelined pages, parallel parts with exact
per-part resume, and S3 Inventory reports (CSV gzip and Parquet)."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from captioning.broker import create_app
from captioning.checkpoints import Checkpoints
from captioning.errors import ConfigError
from captioning.queues import job_of
from captioning.settings import Settings
from captioning.storage import ListedObject, S3Store
from captioning.uris import parse_prefix
from captioning.wire import expand
from producer.backfill import Filters
from producer.inventory import parse_manifest, read_manifest
from producer.keys import s3_location
from producer.listing import backfill_parts, inventory_parts, prefetched, prefix_parts
from tests.conftest import settings_env


@pytest.fixture
def test_queue(settings: Settings) -> Iterator[str]:
    name = f"captions.test.{uuid.uuid4().hex[:8]}"
    yield name
    redis.Redis.from_url(settings.broker_url).delete(name)


def queued_uris(settings: Settings, queue: str) -> list[str]:
    raw = redis.Redis.from_url(settings.broker_url).lrange(queue, 0, -1)
    jobs = [expand(job) for job in map(job_of, raw) if job is not None]
    return [item["uri"] for job in jobs for item in job["items"]]  # type: ignore[index]


def page_of(*keys: str) -> list[ListedObject]:
    return [ListedObject(k, "", 1, datetime.now(UTC)) for k in keys]


def test_prefetched_keeps_order_hands_over_errors_and_stops_when_closed() -> None:
    pages = [page_of(f"{n}.jpg") for n in range(10)]
    assert list(prefetched(iter(pages))) == pages

    def broken() -> Iterator[list[ListedObject]]:
        yield pages[0]
        raise ConnectionError("listing failed")

    with pytest.raises(ConnectionError, match="listing failed"):
        list(prefetched(broken()))

    produced: list[int] = []

    def endless() -> Iterator[list[ListedObject]]:
        n = 0
        while True:
            produced.append(n)
            yield pages[0]
            n += 1

    ahead = prefetched(endless(), depth=2)
    next(ahead)
    ahead.close()
    threading.Event().wait(0.5)
    settled = len(produced)
    threading.Event().wait(0.3)
    assert len(produced) == settled <= 5  # the fetch thread stopped, a few pages ahead at most


def run(settings: Settings, parts, queue: str, *, resume: bool = False, **options) -> object:
    source = "s3://photos/whatever/"
    return backfill_parts(
        parts, app=create_app(settings), queue_name=queue, name=f"n-{queue}", source=source,
        workers=3, resume=resume, checkpoints=Checkpoints(redis.Redis.from_url(
            settings.broker_url)), results=None, settings=settings, batch_size=4,
        filters=options.pop("filters", Filters()), **options,
    )


def test_parallel_listing_queues_every_image_once_and_resumes_each_part_exactly(
    settings: Settings, s3, prefix: str, test_queue: str
) -> None:
    keys = [f"{prefix}{d}/{n}.jpg" for d in ("a", "b", "c") for n in range(6)]
    keys += [f"{prefix}top{n}.png" for n in range(3)] + [f"{prefix}b/notes.txt"]
    for key in keys:
        s3.put_object(Bucket="photos", Key=key, Body=b"x")
    images = sorted(f"s3://photos/{k}" for k in keys if not k.endswith(".txt"))
    store = S3Store(settings)
    source = parse_prefix(f"s3://photos/{prefix}")
    parts = prefix_parts(store, source)
    assert sorted(part.label for part in parts) == ["", "a/", "b/", "c/"]

    first = run(settings, parts, test_queue, limit=5, filters=Filters(prefix=source.key))
    assert first.enqueued == 5 + 5 + 5 + 3 and not first.finished  # type: ignore[attr-defined]
    report = run(settings, parts, test_queue, resume=True, filters=Filters(prefix=source.key))
    assert report.finished and report.enqueued == len(images)  # type: ignore[attr-defined]
    assert sorted(queued_uris(settings, test_queue)) == images  # each exactly once

    given = prefix_parts(store, source, ["a/", "c/"])
    assert [part.source.key for part in given] == [f"{prefix}a/", f"{prefix}c/"]


def upload_inventory(s3, prefix: str, source_bucket: str) -> tuple[str, list[str]]:
    """A two-file report (CSV gzip and Parquet), as S3 Inventory writes them."""
    base = f"{prefix}inventory/{source_bucket}/daily/2026-12-01T01-00Z"
    csv_rows = [
        (source_bucket, quote(f"{prefix}pics/café {n}.jpg"), "", "true", "false", "10",
         "2026-11-30T10:00:00.000Z", f'"etag{n}"')
        for n in range(5)
    ]
    csv_rows.append((source_bucket, quote(f"{prefix}pics/gone.jpg"), "v1", "false", "true",
                     "", "2026-11-30T10:00:00.000Z", ""))
    csv_rows.append((source_bucket, quote(f"{prefix}pics/readme.txt"), "", "true", "false",
                     "3", "2026-11-30T10:00:00.000Z", '"e"'))
    csv_rows.append((source_bucket, quote(f"{prefix}pics/old.jpg"), "", "true", "false",
                     "3", "2020-01-01T10:00:00.000Z", '"e"'))
    text = "\n".join(",".join(f'"{v}"' for v in row) for row in csv_rows) + "\n"
    s3.put_object(Bucket="uploads", Key=f"{base}/files/a.csv.gz",
                  Body=gzip.compress(text.encode()))
    parquet_keys = [f"{prefix}pics/p{n}.webp" for n in range(4)] + ["elsewhere/x.jpg"]
    table = pa.table({
        "bucket": [source_bucket] * 5, "key": parquet_keys, "size": [7] * 5,
        "last_modified_date": pa.array([datetime(2026, 11, 30, tzinfo=UTC)] * 5,
                                       pa.timestamp("ms", tz="UTC")),
        "e_tag": [f"pq{n}" for n in range(5)],
    })
    sink = io.BytesIO()
    pq.write_table(table, sink)
    s3.put_object(Bucket="uploads", Key=f"{base}/files/b.parquet", Body=sink.getvalue())
    manifest = {
        "sourceBucket": source_bucket, "destinationBucket": "arn:aws:s3:::uploads",
        "version": "2016-11-30", "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, "
                      "LastModifiedDate, ETag",
        "files": [{"key": f"{base}/files/a.csv.gz", "size": 1, "MD5checksum": "x"}],
    }
    s3.put_object(Bucket="uploads", Key=f"{base}/manifest.json", Body=json.dumps(manifest))
    s3.put_object(Bucket="uploads", Key=f"{base}/parquet-manifest.json", Body=json.dumps({
        **manifest, "fileFormat": "Parquet", "fileSchema": "message s3.inventory {}",
        "files": [{"key": f"{base}/files/b.parquet", "size": 1, "MD5checksum": "x"}],
    }))
    expected = [f"s3://{source_bucket}/{prefix}pics/café {n}.jpg" for n in range(5)]
    expected += [f"s3://{source_bucket}/{k}" for k in parquet_keys[:4]]
    return base, sorted(expected)


def test_inventory_backfill_reads_csv_gzip_and_parquet_and_resumes_per_file(
    settings: Settings, s3, prefix: str, test_queue: str
) -> None:
    base, expected = upload_inventory(s3, prefix, "photos")
    store = S3Store(settings)
    csv_manifest = read_manifest(store, s3_location("uploads", f"{base}/manifest.json"))
    parquet_manifest = read_manifest(
        store, s3_location("uploads", f"{base}/parquet-manifest.json")
    )
    parts = [*inventory_parts(store, csv_manifest, prefix),
             *inventory_parts(store, parquet_manifest, prefix)]
    since = Filters(prefix=prefix, since=datetime(2026, 1, 1, tzinfo=UTC))
    first = run(settings, parts, test_queue, limit=2, filters=since)
    assert first.enqueued == 4  # type: ignore[attr-defined]
    report = run(settings, parts, test_queue, resume=True, filters=since)
    assert report.finished and report.enqueued == len(expected)  # type: ignore[attr-defined]
    assert sorted(queued_uris(settings, test_queue)) == expected

    matched = f"{test_queue}.match"
    run(settings, parts, matched, filters=Filters(prefix=prefix, match="pics/p[12].*"))
    assert sorted(queued_uris(settings, matched)) == [
        f"s3://photos/{prefix}pics/p1.webp", f"s3://photos/{prefix}pics/p2.webp"
    ]
    redis.Redis.from_url(settings.broker_url).delete(matched)


def test_a_file_that_is_not_a_manifest_is_a_config_error() -> None:
    where = s3_location("b", "m.json")
    with pytest.raises(ConfigError, match="not an S3 Inventory manifest"):
        parse_manifest(where, b'{"files": []}')
    with pytest.raises(ConfigError, match="ORC is not supported"):
        parse_manifest(where, json.dumps({
            "sourceBucket": "s", "destinationBucket": "d", "fileFormat": "ORC", "files": [],
        }).encode())


def captioner(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], env=settings_env(settings),
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_backfill_cli_reads_an_inventory_and_lists_parts_in_parallel(
    settings: Settings, s3, prefix: str
) -> None:
    base, _ = upload_inventory(s3, prefix, "photos")
    manifest = f"s3://uploads/{base}/manifest.json"
    done = captioner(settings, "backfill", "--inventory", manifest, f"s3://photos/{prefix}",
                     "--dry-run", "--list-workers", "2", "--no-skip-existing")
    assert done.returncode == 0, done.stderr
    # the CSV file: 5 images, old.jpg and readme.txt (the delete marker is not listed)
    assert "listed 7 objects, 6 images" in done.stdout
    assert "would enqueue 6 images" in done.stdout

    for d in ("x", "y"):
        for n in range(3):
            s3.put_object(Bucket="photos", Key=f"{prefix}tree/{d}/{n}.jpg", Body=b"x")
    tree = f"s3://photos/{prefix}tree/"
    split = captioner(settings, "backfill", tree, "--dry-run", "--list-workers", "2",
                      "--no-skip-existing", "--match", "y/*")
    assert "listed 6 objects, 3 images" in split.stdout, split.stderr
    given = captioner(settings, "backfill", tree, "--dry-run", "--split", "x/",
                      "--no-skip-existing")
    assert "listed 3 objects, 3 images" in given.stdout, given.stderr

    refused = captioner(settings, "backfill", tree, "--list-workers", "2", "--limit", "3")
    assert refused.returncode == 2 and "--limit works on one listing stream" in refused.stderr
    other = captioner(settings, "backfill", "--inventory", manifest, "s3://uploads/x/")
    assert other.returncode == 2 and "the inventory lists bucket 'photos'" in other.stderr
