"""Dataset figures (issue 12), each compared side by side in one run:

    .venv/bin/python -m bench.datasets listing     # backfill vs raw listing; 4 list workers vs 1
    .venv/bin/python -m bench.datasets inventory   # S3 Inventory backfill of 1,000,000 keys
    .venv/bin/python -m bench.datasets enqueue     # enqueue --from-file, 1,000,000 URIs; bytes
    .venv/bin/python -m bench.datasets export      # export of 1,000,000 rows: rows/s, peak memory
    .venv/bin/python -m bench.datasets puts        # object-store PUTs per 10,000 images

Every run uses a private redis-server and SeaweedFS, and a PostgreSQL database of its own on
127.0.0.1 (created and dropped here). "CLI" rows run `python -m cli ...` in a fresh process,
start-up included; "in-process" rows call the library. "before" rows run the same command
from a checkout of the given git revision (default `main`), the code before this work.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import redis

from captioning.broker import create_app
from captioning.checkpoints import Checkpoint
from captioning.embedded import PrivateRedis
from captioning.messages import BULK_QUEUE
from captioning.results import CaptionRow, ResultsStore
from captioning.settings import Settings
from captioning.storage import S3Store, Stores
from captioning.uris import parse_prefix
from producer.backfill import Filters, backfill
from producer.enqueue import PUBLISH_BATCH, JobSender
from producer.inventory import read_manifest
from producer.listing import backfill_parts, inventory_parts, pipelined, prefix_parts
from tests.services import SeaweedS3
from workers.write import ResultWriter

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@contextmanager
def bench_database() -> Iterator[str]:
    name = f"captioner_bench_{os.getpid()}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    ResultsStore(url).create_schema()
    try:
        yield url
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def seaweed(workdir: Path, *buckets: str) -> Iterator[SeaweedS3]:
    server = SeaweedS3(workdir / "seaweed")
    server.start()
    client = server.client()
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """A detached worktree of `revision`: the code before this work, for "before" rows."""
    path = Path(tempfile.mkdtemp(prefix="captioner-before-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), revision],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                       check=True, capture_output=True)


def cli(settings: Settings, *args: str, code: Path = ROOT, stdout: int | None = None
        ) -> tuple[float, float]:
    """Run `python -m cli ARGS` from `code` in a fresh process: (seconds, peak RSS MiB).
    The peak comes from the kernel's accounting of that one child (wait4)."""
    env = {**os.environ, **settings.as_env(), "PYTHONPATH": str(code),
           "CAPTIONER_LOG_LEVEL": "WARNING"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "cli", *args], env=env, cwd=code,
                                   stdout=stdout or out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        if process.returncode:
            raise RuntimeError(f"captioner {' '.join(args)} failed:\n{err.read()[-2000:]}")
        return seconds, usage.ru_maxrss / 1024


def table(title: str, header: tuple[str, ...], rows: list[tuple[object, ...]]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(h)), *(len(_cell(r[i])) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(_cell(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def put_many(server: SeaweedS3, bucket: str, keys: list[str], body: bytes = b"x") -> None:
    client = server.client()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=bucket, Key=key, Body=body), keys))


def s3_requests(server: SeaweedS3, bucket: str) -> dict[str, int]:
    """Requests by type that SeaweedFS itself counted for `bucket` (its Prometheus metrics)."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("SeaweedFS_s3_request_seconds_count{") and f'bucket="{bucket}"' in line:
            kind = line.split('type="', 1)[1].split('"', 1)[0]
            counts[kind] = counts.get(kind, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


# -- listing ----------------------------------------------------------------------------------


def cmd_listing(args: argparse.Namespace) -> None:
    dirs = 8
    keys = [f"p/d{n % dirs}/{n:07d}.jpg" for n in range(args.objects)]
    rows: list[tuple[object, ...]] = []
    with (tempfile.TemporaryDirectory() as tmp, seaweed(Path(tmp), "bench") as server,
          PrivateRedis() as broker, bench_database() as database):
        put_many(server, "bench", keys)
        settings = Settings(broker_url=broker.url, database_url=database,
                            s3_endpoint_url=server.endpoint, model="tiny-random-blip2")
        store = S3Store(settings)
        results = ResultsStore(database)
        flush = redis.Redis.from_url(broker.url).flushdb
        source = parse_prefix("s3://bench/p/")

        def raw() -> int:
            return sum(len(page) for page in store.list("bench", "p/"))

        def one_stream(lister: Callable[..., Iterator[list]], batch: int  # type: ignore[type-arg]
                       ) -> Callable[[], int]:
            def go() -> int:
                with JobSender(create_app(settings), BULK_QUEUE, batch=batch) as sender:
                    return backfill(
                        source, list_pages=lister, results=results, sender=sender,
                        settings=settings, batch_size=32, filters=Filters(prefix="p/"),
                        checkpoint=Checkpoint(name=f"b{time.time()}", source="s3://bench/p/"),
                    ).enqueued
            return go

        def parts(workers: int) -> Callable[[], int]:
            def go() -> int:
                return backfill_parts(
                    prefix_parts(store, source), app=create_app(settings),
                    queue_name=BULK_QUEUE, name=f"w{workers}-{time.time()}",
                    source="s3://bench/p/", workers=workers, resume=False, checkpoints=None,
                    results=results, settings=settings, batch_size=32,
                    filters=Filters(prefix="p/"),
                ).enqueued
            return go

        cases = [
            ("raw single-stream listing (ListObjectsV2 pages)", "in-process", raw),
            ("backfill, page by page, a round trip per job (before)", "in-process",
             one_stream(store.list, 0)),
            ("backfill, pipelined listing and Redis writes", "in-process",
             one_stream(pipelined(store.list), PUBLISH_BATCH)),
            ("backfill --list-workers 1 (8 sub-prefixes)", "in-process", parts(1)),
            ("backfill --list-workers 4 (8 sub-prefixes)", "in-process", parts(4)),
        ]
        timings: dict[str, float] = {}
        for _round in range(args.rounds):
            for name, where, run in cases:
                flush()
                started = time.perf_counter()
                count = run()
                seconds = time.perf_counter() - started
                timings[name] = min(timings.get(name, seconds), seconds)
                rows.append((name, where, count, seconds, count / seconds))
        for label, extra in (("backfill CLI", ()), ("backfill CLI --list-workers 4",
                                                     ("--list-workers", "4"))):
            flush()
            seconds, _ = cli(settings, "backfill", "s3://bench/p/", "--max-queue-depth", "0",
                                  *extra)
            rows.append((label, "CLI, fresh process", args.objects, seconds,
                         args.objects / seconds))
    table(f"listing {args.objects:,} objects on SeaweedFS (skip-existing on, PostgreSQL; "
          "private Redis)", ("path", "how", "objects", "s", "objects/s"), rows)
    raw_s = timings[cases[0][0]]
    print(f"\nbest of {args.rounds}: pipelined backfill / raw listing speed = "
          f"{raw_s / timings[cases[2][0]]:.2f}; unpipelined = {raw_s / timings[cases[1][0]]:.2f}; "
          f"4 list workers vs 1 = {timings[cases[3][0]] / timings[cases[4][0]]:.2f}x")


# -- inventory --------------------------------------------------------------------------------


def inventory_csv(keys: range, bucket: str) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_ALL)
    for n in keys:
        writer.writerow((bucket, f"photos/2024/{n:09d}.jpg", str(1000 + n % 7),
                         "2024-06-01T00:00:00.000Z", f"{n:032x}"))
    return gzip.compress(out.getvalue().encode(), compresslevel=1)


def upload_inventory(server: SeaweedS3, keys: int, files: int) -> str:
    client = server.client()
    base = "inv/photos/daily/2026-12-01T01-00Z"
    per_file = keys // files
    entries = []
    for f in range(files):
        key = f"{base}/data/{f:03d}.csv.gz"
        body = inventory_csv(range(f * per_file, (f + 1) * per_file), "photos")
        client.put_object(Bucket="inventory", Key=key, Body=body)
        entries.append({"key": key, "size": len(body), "MD5checksum": ""})
    manifest = {"sourceBucket": "photos", "destinationBucket": "arn:aws:s3:::inventory",
                "version": "2016-11-30", "fileFormat": "CSV",
                "fileSchema": "Bucket, Key, Size, LastModifiedDate, ETag", "files": entries}
    client.put_object(Bucket="inventory", Key=f"{base}/manifest.json", Body=json.dumps(manifest))
    return f"s3://inventory/{base}/manifest.json"


def cmd_inventory(args: argparse.Namespace) -> None:
    rows: list[tuple[object, ...]] = []
    with (tempfile.TemporaryDirectory() as tmp, seaweed(Path(tmp), "inventory") as server,
          PrivateRedis() as broker, bench_database() as database):
        manifest_uri = upload_inventory(server, args.keys, args.files)
        settings = Settings(broker_url=broker.url, database_url=database,
                            s3_endpoint_url=server.endpoint, model="tiny-random-blip2")
        store = S3Store(settings)
        flush = redis.Redis.from_url(broker.url).flushdb
        manifest = read_manifest(store, parse_prefix(manifest_uri))
        memory = redis.Redis.from_url(broker.url).info
        for workers, skip in ((1, False), (args.files, False), (args.files, True)):
            flush()
            base = int(memory("memory")["used_memory"])
            started = time.perf_counter()
            report = backfill_parts(
                inventory_parts(store, manifest, ""), app=create_app(settings),
                queue_name=BULK_QUEUE, name=f"inv{workers}{skip}", source=manifest_uri,
                workers=workers, resume=False, checkpoints=None,
                results=ResultsStore(database) if skip else None, settings=settings,
                batch_size=32, filters=Filters(),
            )
            seconds = time.perf_counter() - started
            queued = (int(memory("memory")["used_memory"]) - base) / report.enqueued
            rows.append((f"--list-workers {workers}, skip-existing {'on' if skip else 'off'}",
                         "in-process", report.enqueued, seconds, report.enqueued / seconds,
                         queued))
        for skip in ("--no-skip-existing", "--skip-existing"):
            flush()
            base = int(memory("memory")["used_memory"])
            seconds, _ = cli(settings, "backfill", "--inventory", manifest_uri,
                                "--list-workers", str(args.files), "--max-queue-depth", "0",
                                skip)
            rows.append((f"CLI --list-workers {args.files} {skip}", "CLI, fresh process",
                         args.keys, seconds, args.keys / seconds,
                         (int(memory("memory")["used_memory"]) - base) / args.keys))
    table(f"S3 Inventory backfill, {args.keys:,} keys in {args.files} CSV.gz files "
          "(SeaweedFS, private Redis, PostgreSQL)",
          ("path", "how", "URIs", "s", "URIs/s", "Redis B/image (with ETags)"), rows)


# -- enqueue ----------------------------------------------------------------------------------


def cmd_enqueue(args: argparse.Namespace) -> None:
    rows: list[tuple[object, ...]] = []
    with tempfile.TemporaryDirectory() as tmp, checkout(args.before) as before:
        uris = Path(tmp) / "uris.txt"
        with open(uris, "w") as handle:
            for n in range(args.uris):
                handle.write(f"s3://photos-bucket/2024/uploads/{n:09d}.jpg\n")
        for label, code in (("before", before), ("now", ROOT)):
            with PrivateRedis() as broker:
                client = redis.Redis.from_url(broker.url)
                settings = Settings(broker_url=broker.url, model="tiny-random-blip2")
                base = int(client.info("memory")["used_memory"])
                seconds, _ = cli(settings, "enqueue", "--from-file", str(uris), "--queue",
                                      BULK_QUEUE, code=code)
                used = int(client.info("memory")["used_memory"]) - base
                rows.append((label, "CLI, fresh process", args.uris, seconds, args.uris / seconds,
                             used / args.uris))
    table(f"captioner enqueue --from-file, {args.uris:,} URIs at 32 per job (private Redis); "
          f"before = {args.before}", ("code", "how", "URIs", "s", "URIs/s", "Redis B/image"),
          rows)


# -- export -----------------------------------------------------------------------------------


def fill_rows(database: str, count: int) -> None:
    """`count` caption rows through PostgreSQL COPY (the export reads them; how they got there
    does not matter)."""
    when = datetime(2026, 1, 1, tzinfo=UTC)
    columns = ("id", "uri", "bucket", "key", "etag", "version_id", "model", "prompt", "status",
               "caption", "error", "width", "height", "bytes", "attempts", "enqueued_at",
               "finished_at", "worker", "content_digest")
    with psycopg.connect(database) as conn, conn.cursor() as cursor, cursor.copy(
        f"COPY captions ({', '.join(columns)}) FROM STDIN"
    ) as copy:
        for n in range(count):
            key = f"2024/{n % 1000:03d}/{n:09d}.jpg"
            copy.write_row((f"{n:064x}", f"s3://photos/{key}", "photos", key, f"{n:032x}", None,
                            "Salesforce/blip2-opt-2.7b", "", "ok",
                            f"a photograph of a cat sitting on a red sofa, number {n}", None,
                            640, 480, 123_456, 1, when, when + timedelta(seconds=n), "w:1",
                            f"{n:064x}"))


def cmd_export(args: argparse.Namespace) -> None:
    rows: list[tuple[object, ...]] = []
    with tempfile.TemporaryDirectory() as tmp, bench_database() as database:
        started = time.perf_counter()
        fill_rows(database, args.rows)
        print(f"filled {args.rows:,} rows in {time.perf_counter() - started:.1f} s")
        settings = Settings(database_url=database)
        for fmt in ("parquet", "jsonl", "csv"):
            out = Path(tmp) / f"export.{fmt}"
            seconds, peak = cli(settings, "export", "--format", fmt, "-o", str(out))
            rows.append((f"export --format {fmt}", seconds, args.rows / seconds, peak,
                         out.stat().st_size / 2**20))
        with open(Path(tmp) / "results.csv", "w") as sink:
            seconds, peak = cli(settings, "results", "--format", "csv", stdout=sink.fileno())
        rows.append(("results --format csv (naive: all rows in memory)", seconds,
                     args.rows / seconds, peak, (Path(tmp) / "results.csv").stat().st_size / 2**20))
    table(f"{args.rows:,} rows from PostgreSQL, CLI in a fresh process each",
          ("command", "s", "rows/s", "peak RSS MiB", "output MiB"), rows)


# -- PUTs -------------------------------------------------------------------------------------


def cmd_puts(args: argparse.Namespace) -> None:
    rows: list[tuple[object, ...]] = []
    when = datetime.now(UTC)
    with (tempfile.TemporaryDirectory() as tmp, seaweed(Path(tmp), "sidecar", "parquet") as server,
          bench_database() as database, ThreadPoolExecutor(16) as pool):
        store = ResultsStore(database)
        for fmt in ("sidecar", "parquet"):
            settings = Settings(database_url=database, s3_endpoint_url=server.endpoint,
                                results_uri=f"s3://{fmt}/v1", results_format=fmt)
            writer = ResultWriter(store, Stores(settings), settings.results_uri, pool, fmt)
            before = s3_requests(server, fmt)
            started = time.perf_counter()
            for job in range(0, args.images, 32):
                writer.write([
                    CaptionRow(uri=f"s3://photos/{fmt}/{n:07d}.jpg", bucket="photos",
                               key=f"{fmt}/{n:07d}.jpg", etag=f"{n:032x}", version_id=None,
                               model="Salesforce/blip2-opt-2.7b", prompt="", status="ok",
                               caption="a photograph of a cat on a sofa", error=None,
                               width=640, height=480, bytes=123_456,
                               enqueued_at=when + timedelta(seconds=job), finished_at=when,
                               worker="w", content_digest=f"{n:064x}")
                    for n in range(job, min(job + 32, args.images))
                ])
            seconds = time.perf_counter() - started
            after = s3_requests(server, fmt)
            puts = after.get("PUT", 0) - before.get("PUT", 0)
            rows.append((f"CAPTIONER_RESULTS_FORMAT={fmt}", args.images, puts,
                         puts * 10_000 / args.images, seconds))
    table(f"results of {args.images:,} images in jobs of 32, PUTs counted by SeaweedFS "
          "(its s3 request metrics); the worker's writer in-process",
          ("format", "images", "PUTs", "PUTs per 10,000", "write s"), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(required=True)
    listing = commands.add_parser("listing")
    listing.add_argument("--objects", type=int, default=10_000)
    listing.add_argument("--rounds", type=int, default=3)
    listing.set_defaults(run=cmd_listing)
    inventory = commands.add_parser("inventory")
    inventory.add_argument("--keys", type=int, default=1_000_000)
    inventory.add_argument("--files", type=int, default=4)
    inventory.set_defaults(run=cmd_inventory)
    enqueue = commands.add_parser("enqueue")
    enqueue.add_argument("--uris", type=int, default=1_000_000)
    enqueue.add_argument("--before", default="main", help="git revision for the 'before' row")
    enqueue.set_defaults(run=cmd_enqueue)
    export = commands.add_parser("export")
    export.add_argument("--rows", type=int, default=1_000_000)
    export.set_defaults(run=cmd_export)
    puts = commands.add_parser("puts")
    puts.add_argument("--images", type=int, default=10_000)
    puts.set_defaults(run=cmd_puts)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
