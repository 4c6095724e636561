"""Ingest figures for docs/ingest.md: enqueue throughput, Redis memory, upload-to-row latency.

    .venv/bin/python -m bench.ingest throughput   # URIs/s listing -> Redis, vs a naive loop
    .venv/bin/python -m bench.ingest memory       # bytes per queued image, backfill peak
    .venv/bin/python -m bench.ingest latency      # upload -> row, with and without a backlog

Every run uses a private redis-server (and SeaweedFS, SQLite, a tiny-model worker where
needed), never the shared services. "In-process lister" rows use a generator of listing
pages in place of S3: it exists only here, to show what the enqueue path sustains when the
store lists fast; the SeaweedFS rows are the real listing path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import redis

from captioning.broker import create_app
from captioning.checkpoints import Checkpoint
from captioning.embedded import PrivateRedis
from captioning.messages import BULK_QUEUE, REALTIME_QUEUE, TASK_NAME, CaptionJob, JobItem
from captioning.results import ResultsStore
from captioning.settings import Settings
from captioning.storage import ListedObject, S3Store
from captioning.uris import parse_prefix
from producer.backfill import Pacing, backfill
from producer.dedupe import Deduper
from producer.enqueue import JobSender
from producer.events import ObjectRef
from producer.pacing import QueueGate

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["HF_HUB_OFFLINE"] = "1"


def fake_pages(
    count: int, page_size: int = 1000
) -> Callable[[str, str, str], Iterator[list[ListedObject]]]:
    """BENCH ONLY: listing pages from memory, as fast as a store could ever list."""
    when = datetime.now(UTC)

    def list_pages(
        _bucket: str, prefix: str, start_after: str = ""
    ) -> Iterator[list[ListedObject]]:
        for start in range(0, count, page_size):
            yield [
                ListedObject(
                    key=f"{prefix}{n:09d}.jpg", etag=f"{n:032x}", size=1, last_modified=when
                )
                for n in range(start, min(count, start + page_size))
            ]

    return list_pages


def run_backfill(
    settings: Settings,
    list_pages,
    source: str,
    *,
    results=None,
    pacing: Pacing | None = None,
    batch_size: int = 32,
) -> tuple[int, float]:
    started = time.perf_counter()
    with JobSender(create_app(settings), BULK_QUEUE) as sender:
        report = backfill(
            parse_prefix(source),
            list_pages=list_pages,
            results=results,
            sender=sender,
            settings=settings,
            batch_size=batch_size,
            checkpoint=Checkpoint(name=source, source=source),
            pacing=pacing,
        )
    return report.enqueued, time.perf_counter() - started


def naive_loop(settings: Settings, count: int) -> tuple[int, float]:
    """One message per image through send_task, as `task.delay(uri)` would do."""
    app = create_app(settings)
    started = time.perf_counter()
    for n in range(count):
        job = CaptionJob(
            items=(JobItem(uri=f"s3://b/naive/{n:09d}.jpg"),),
            model=settings.model,
            source="backfill",
        )
        app.send_task(TASK_NAME, args=[job.to_message()], queue=BULK_QUEUE)
    return count, time.perf_counter() - started


def seaweed_source(count: int, workdir: Path):
    from tests.services import SeaweedS3

    server = SeaweedS3(workdir / "seaweed")
    server.start()
    client = server.client()
    client.create_bucket(Bucket="bench")
    with ThreadPoolExecutor(32) as pool:
        list(
            pool.map(
                lambda n: client.put_object(Bucket="bench", Key=f"p/{n:07d}.jpg", Body=b"x"),
                range(count),
            )
        )
    return server


def cmd_throughput(args: argparse.Namespace) -> None:
    rows: list[tuple[str, int, float]] = []
    with tempfile.TemporaryDirectory() as tmp, PrivateRedis() as broker:
        settings = Settings(
            broker_url=broker.url,
            model="tiny-random-blip2",
            database_url=f"sqlite:///{tmp}/bench.db",
        )
        flush = redis.Redis.from_url(broker.url).flushdb
        rows.append(
            ("naive: 1 message per image (send_task loop)", *naive_loop(settings, args.naive))
        )
        flush()
        rows.append(
            (
                "backfill, in-process lister*, no skip-existing",
                *run_backfill(settings, fake_pages(args.fast), "s3://b/p/"),
            )
        )
        flush()
        results = ResultsStore(settings.database_url)
        results.create_schema()
        rows.append(
            (
                "backfill, in-process lister*, skip-existing (SQLite)",
                *run_backfill(settings, fake_pages(args.fast), "s3://b/p/", results=results),
            )
        )
        flush()
        server = seaweed_source(args.seaweed, Path(tmp))
        try:
            s3 = S3Store(Settings(s3_endpoint_url=server.endpoint))
            started = time.perf_counter()
            listed = sum(len(page) for page in s3.list("bench", "p/"))
            rows.append(
                (
                    "SeaweedFS listing alone (ListObjectsV2 pages)",
                    listed,
                    time.perf_counter() - started,
                )
            )
            rows.append(
                (
                    "backfill, SeaweedFS listing, no skip-existing",
                    *run_backfill(settings, s3.list, "s3://bench/p/"),
                )
            )
        finally:
            server.stop()
    naive_rate = rows[0][1] / rows[0][2]
    print(f"{'path':<55} {'URIs':>8} {'s':>7} {'URIs/s':>9} {'x naive':>8}")
    for name, count, seconds in rows:
        rate = count / seconds
        print(f"{name:<55} {count:>8} {seconds:>7.2f} {rate:>9,.0f} {rate / naive_rate:>8.1f}")
    print("* in-process lister: bench-only generator of listing pages standing in for a fast store")


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def cmd_memory(args: argparse.Namespace) -> None:
    for label, per_job, images in (
        ("1 image per message", 1, 10_000),
        ("32 images per message", 32, 100_000),
        ("64 images per message", 64, 100_000),
    ):
        with PrivateRedis() as broker:
            client = redis.Redis.from_url(broker.url)
            settings = Settings(broker_url=broker.url, model="tiny-random-blip2")
            JobSender(create_app(settings), BULK_QUEUE).__enter__().send(  # declare the queue
                CaptionJob(items=(JobItem(uri="s3://b/x.jpg"),), model="m", source="cli")
            )
            client.delete(BULK_QUEUE)
            before = used_memory(client)
            run_backfill(
                settings, fake_pages(images), "s3://photos-bucket/2024/uploads/", batch_size=per_job
            )
            queued = used_memory(client) - before
            print(f"{label:<24} {images:>7} images queued: {queued / images:7.0f} bytes/image")
    with PrivateRedis() as broker:
        client = redis.Redis.from_url(broker.url)
        before = used_memory(client)
        refs = [
            ObjectRef("photos-bucket", f"2024/uploads/{n:09d}.jpg", f"{n:032x}")
            for n in range(50_000)
        ]
        deduper = Deduper(client)
        for start in range(0, len(refs), 1000):
            deduper.claim(refs[start : start + 1000])
        print(
            f"dedupe keys (6 h TTL)    {len(refs):>7} events:        "
            f"{(used_memory(client) - before) / len(refs):7.0f} bytes/event"
        )
    for max_depth in (None, args.max_depth):
        peak_backfill(args.objects, max_depth, args.drain_rate)


def peak_backfill(objects: int, max_depth: int | None, drain_rate: int) -> None:
    """A backfill of `objects` while a drain thread (standing in for workers) pops jobs."""
    with PrivateRedis() as broker:
        client = redis.Redis.from_url(broker.url)
        settings = Settings(broker_url=broker.url, model="tiny-random-blip2")
        baseline = used_memory(client)
        stop = threading.Event()

        def drain() -> None:
            popper = redis.Redis.from_url(broker.url)
            per_job_s = 32 / drain_rate
            while not stop.is_set():
                popper.rpop(BULK_QUEUE)
                time.sleep(per_job_s)

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        gate = (
            QueueGate(client, BULK_QUEUE, max_images=max_depth, images_per_job=32)
            if max_depth
            else None
        )
        sent, seconds = run_backfill(
            settings,
            fake_pages(objects),
            "s3://photos-bucket/2024/uploads/",
            pacing=Pacing(gate=gate),
        )
        peak = int(client.info("memory")["used_memory_peak"]) - baseline
        stop.set()
        label = f"--max-queue-depth {max_depth:,}" if max_depth else "no --max-queue-depth"
        print(
            f"backfill {sent:,} objects, {label:<26} drain {drain_rate:,}/s: "
            f"{seconds:6.1f} s, peak Redis +{peak / 2**20:6.1f} MiB, paused "
            f"{gate.paused_s if gate else 0:5.1f} s"
        )


def cmd_latency(args: argparse.Namespace) -> None:
    from producer.batcher import LingerBatcher
    from producer.listeners import EventEnqueuer, WebhookServer
    from tests.imagefactory import photo_bytes
    from tests.services import SeaweedS3

    with tempfile.TemporaryDirectory() as tmp, PrivateRedis() as broker:
        seaweed = SeaweedS3(Path(tmp) / "seaweed")
        seaweed.start()
        s3 = seaweed.client()
        s3.create_bucket(Bucket="uploads")
        settings = Settings(
            broker_url=broker.url,
            database_url=f"sqlite:///{tmp}/captions.db",
            s3_endpoint_url=seaweed.endpoint,
            model="tiny-random-blip2",
            batch_size=8,
            max_new_tokens=8,
        )
        results = ResultsStore(settings.database_url)
        results.create_schema()
        env = {
            **os.environ,
            "CAPTIONER_BROKER_URL": settings.broker_url,
            "CAPTIONER_DATABASE_URL": settings.database_url,
            "CAPTIONER_S3_ENDPOINT_URL": seaweed.endpoint,
            "CAPTIONER_MODEL": settings.model,
            "CAPTIONER_BATCH_SIZE": "8",
            "CAPTIONER_MAX_NEW_TOKENS": "8",
        }
        log = open(Path(tmp) / "worker.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--loglevel", "INFO"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        photo = photo_bytes()["rocket.jpg"]
        try:
            while "ready" not in (Path(tmp) / "worker.log").read_text(errors="replace"):
                time.sleep(0.2)
            with JobSender(create_app(settings), REALTIME_QUEUE) as sender:
                enqueuer = EventEnqueuer(
                    sender, Deduper(redis.Redis.from_url(broker.url)), settings, 32
                )
                batcher = LingerBatcher(enqueuer, batch_size=32)
                server = WebhookServer(
                    ("127.0.0.1", 0), batcher, secret="bench",
                    socket_timeout_s=settings.webhook_timeout_s,
                )
                threading.Thread(target=server.serve_forever, daemon=True).start()
                port = server.server_address[1]
                upload(s3, results, port, photo, "warmup/0.jpg")
                quiet = [
                    upload(s3, results, port, photo, f"quiet/{n}.jpg") for n in range(args.uploads)
                ]
                backlog_keys = [f"bulk/{n}.jpg" for n in range(100)]
                with ThreadPoolExecutor(16) as pool:
                    list(
                        pool.map(
                            lambda k: s3.put_object(Bucket="uploads", Key=k, Body=photo),
                            backlog_keys,
                        )
                    )
                items = [
                    JobItem(uri=f"s3://uploads/{backlog_keys[n % 100]}")
                    for n in range(args.backlog)
                ]
                with JobSender(create_app(settings), BULK_QUEUE) as bulk:
                    for start in range(0, len(items), 32):
                        bulk.send(
                            CaptionJob(
                                items=tuple(items[start : start + 32]),
                                model=settings.model,
                                source="backfill",
                            )
                        )
                client = redis.Redis.from_url(broker.url)
                busy = [
                    upload(s3, results, port, photo, f"busy/{n}.jpg") for n in range(args.uploads)
                ]
                left = int(client.llen(BULK_QUEUE)) * 32
                server.shutdown()
                batcher.close()
        finally:
            worker.terminate()
            worker.wait(timeout=60)
            seaweed.stop()
    for label, samples in (("no backlog", quiet), (f"{args.backlog:,}-image bulk backlog", busy)):
        ordered = sorted(samples)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        print(
            f"upload -> row, {label:<28} n={len(samples)}: p50 {statistics.median(samples):.2f} s, "
            f"p99 {p99:.2f} s, max {ordered[-1]:.2f} s"
        )
    print(f"bulk images still queued after the last timed upload: ~{left:,} (realtime went first)")


def upload(s3, results: ResultsStore, port: int, photo: bytes, key: str) -> float:
    """PUT the object, POST its event as MinIO would, wait for the row: seconds end to end."""
    import http.client

    started = time.perf_counter()
    etag = s3.put_object(Bucket="uploads", Key=key, Body=photo)["ETag"]
    record = {
        "eventName": "s3:ObjectCreated:Put",
        "s3": {"bucket": {"name": "uploads"}, "object": {"key": key, "eTag": etag}},
    }
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(
        "POST", "/", body=json.dumps({"Records": [record]}), headers={"X-Captioner-Secret": "bench"}
    )
    assert connection.getresponse().status == 200
    connection.close()
    # The listener writes a pending row before it answers; wait for the worker's result.
    while not results.rows(prefix=f"s3://uploads/{key}", status="ok"):
        time.sleep(0.01)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(required=True)
    throughput = commands.add_parser("throughput")
    throughput.add_argument("--naive", type=int, default=5_000)
    throughput.add_argument("--fast", type=int, default=200_000)
    throughput.add_argument("--seaweed", type=int, default=5_000)
    throughput.set_defaults(run=cmd_throughput)
    memory = commands.add_parser("memory")
    memory.add_argument("--objects", type=int, default=200_000)
    memory.add_argument("--max-depth", type=int, default=20_000)
    memory.add_argument(
        "--drain-rate", type=int, default=10_000, help="images/s the stand-in workers take"
    )
    memory.set_defaults(run=cmd_memory)
    latency = commands.add_parser("latency")
    latency.add_argument("--uploads", type=int, default=30)
    latency.add_argument("--backlog", type=int, default=3_000)
    latency.set_defaults(run=cmd_latency)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
