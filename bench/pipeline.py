"""End-to-end images/s of one worker against a bare loop: the system's efficiency.

system  `captioner worker` (its defaults, tiny BLIP-2) fed through Redis: jobs of --job-size
        images from SeaweedFS S3, rows upserted into PostgreSQL plus one S3 sidecar per image;
        timed from the first enqueue to the last row in the database.
bare    the same images as bytes in memory, the same model and settings, in this process:
        decode + caption in a plain loop; no queue, no fetch, no writes.
model   the model alone on pixels decoded beforehand: the ceiling, stricter than `bare`
        (the worker decodes in threads while it generates; a plain loop cannot).

It starts its own SeaweedFS (tests/services.py), creates its own PostgreSQL database and uses
Redis database --redis-db (flushed: use one nobody else uses). Rounds alternate bare/system.

    .venv/bin/python -m bench.pipeline [--images 320] [--rounds 2] [--redis-db 13]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import redis
import torch

from bench.photos import SAMPLES
from captioning.broker import create_app
from captioning.messages import BULK_QUEUE
from captioning.results import ResultsStore
from captioning.settings import Settings
from producer.enqueue import JobSender, enqueue_uris
from tests.services import SeaweedS3
from workers.images import decode_image
from workers.pixels import ModelPixels
from workers.runtimes.blip2 import CaptionModel
from workers.runtimes.tiny import TINY_MODEL

BUCKET, RESULTS_BUCKET = "photos", "results"


def sample_files() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(SAMPLES.iterdir()) if p.suffix != ".md"}


def bare_loop(model: CaptionModel, files: list[bytes], settings: Settings, job_size: int) -> float:
    """images/s of decode + caption over in-memory bytes, job by job like the worker."""
    start = time.perf_counter()
    for first in range(0, len(files), job_size):
        pixels = [
            model.to_pixels(
                decode_image(
                    data, max_pixels=settings.max_image_pixels, target_size=model.image_size
                ).image
            )
            for data in files[first : first + job_size]
        ]
        model.caption_pixels(pixels, settings.prompt)
    return len(files) / (time.perf_counter() - start)


def model_only(model: CaptionModel, pixels: list[ModelPixels], prompt: str, job_size: int) -> float:
    """images/s of the model alone on pixels decoded beforehand: the ceiling for any worker."""
    start = time.perf_counter()
    for first in range(0, len(pixels), job_size):
        model.caption_pixels(pixels[first : first + job_size], prompt)
    return len(pixels) / (time.perf_counter() - start)


def system_run(
    settings: Settings, s3, photos: list[tuple[str, bytes]], results: ResultsStore, *,
    job_size: int, timeout: float = 600,
) -> float:
    """images/s from enqueueing len(files) fresh objects to their last row being written."""
    prefix = f"run-{uuid.uuid4().hex[:8]}/"
    uris = []
    for i, (name, data) in enumerate(photos):
        key = f"{prefix}{i:05d}-{name}"
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        uris.append(f"s3://{BUCKET}/{key}")
    before = sum(results.status_counts().values())
    start = time.perf_counter()
    with JobSender(create_app(settings), BULK_QUEUE) as sender:
        enqueue_uris(uris, sender, settings, batch_size=job_size)
    while sum(results.status_counts().values()) < before + len(photos):
        if time.perf_counter() - start > timeout:
            raise RuntimeError("the worker did not finish in time; see its log")
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    failed = results.status_counts().get("failed", 0)
    if failed:
        raise RuntimeError(f"{failed} rows failed: the benchmark expects every image to caption")
    return len(photos) / elapsed


def worker_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **settings.as_env(), "HF_HUB_OFFLINE": "1"}


def start_worker(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--loglevel", "INFO"],
            env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 180
    while " ready: model " not in log_path.read_text(errors="replace"):
        if worker.poll() is not None or time.monotonic() > deadline:
            worker.kill()
            raise RuntimeError(f"worker did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--job-size", type=int, default=32, help="images per job (CLI default)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pool", choices=("prefork", "threads"), default=Settings().pool)
    parser.add_argument("--jobs-in-flight", type=int, default=Settings().jobs_in_flight,
                        help="threads pool only")
    parser.add_argument("--no-sidecars", action="store_true", help="database rows only")
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(name, value)

    samples = sample_files()
    names = [list(samples)[i % len(samples)] for i in range(args.images)]
    photos = [(name, samples[name]) for name in names]
    files = [data for _, data in photos]
    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    redis.Redis.from_url(redis_url).flushdb()
    database = f"captioner_bench_{os.getpid()}"
    with psycopg.connect(args.postgres, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        seaweed = SeaweedS3(Path(tmp) / "seaweed")
        seaweed.start()
        worker = None
        try:
            s3 = seaweed.client()
            for bucket in (BUCKET, RESULTS_BUCKET):
                s3.create_bucket(Bucket=bucket)
            settings = Settings(
                broker_url=redis_url,
                database_url=args.postgres.rsplit("/", 1)[0] + f"/{database}",
                s3_endpoint_url=seaweed.endpoint,
                allowed_buckets=(BUCKET, RESULTS_BUCKET),
                results_uri=None if args.no_sidecars else f"s3://{RESULTS_BUCKET}/captions",
                model=TINY_MODEL,
                max_new_tokens=20,
                pool=args.pool,
                jobs_in_flight=args.jobs_in_flight,
            )
            results = ResultsStore(settings.database_url)
            results.create_schema()
            worker = start_worker(settings, Path(tmp) / "worker.log")
            model = CaptionModel.load(settings.model_copy(update={"device": "cpu"}))
            bare_loop(model, files[: args.job_size], settings, args.job_size)  # warm-up
            system_run(settings, s3, photos[: args.job_size], results, job_size=args.job_size)

            decoded = [
                model.to_pixels(decode_image(data, max_pixels=settings.max_image_pixels,
                                             target_size=model.image_size).image)
                for data in files
            ]
            bare, ceiling, system = [], [], []
            for _ in range(args.rounds):
                bare.append(bare_loop(model, files, settings, args.job_size))
                ceiling.append(model_only(model, decoded, settings.prompt, args.job_size))
                system.append(system_run(settings, s3, photos, results, job_size=args.job_size))
            results.dispose()
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(timeout=60)
            seaweed.stop()
            with psycopg.connect(args.postgres, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            redis.Redis.from_url(redis_url).flushdb()

    report(args, settings, len(samples), list(zip(bare, ceiling, system, strict=True)))



def report(
    args: argparse.Namespace, settings: Settings, samples: int,
    runs: list[tuple[float, float, float]],
) -> None:
    print(f"tiny BLIP-2 on CPU ({os.cpu_count()} cores, torch {torch.__version__}), "
          f"{args.images} images ({samples} sample photos, 0.1-0.8 MB) in jobs of "
          f"{args.job_size}, micro-batch {settings.batch_size}, {settings.max_new_tokens} "
          f"new tokens, {settings.pool} pool"
          f"{f' ({settings.jobs_in_flight} jobs in flight)' if settings.pool == 'threads' else ''}"
          ", sidecars "
          f"{'on' if settings.results_uri else 'off'}")
    print(f"{'round':<6} {'bare img/s':>11} {'model img/s':>12} {'system img/s':>13} "
          f"{'system/bare':>12} {'system/model':>13}")
    for i, (b, m, s) in enumerate(runs, 1):
        print(f"{i:<6} {b:>11.1f} {m:>12.1f} {s:>13.1f} {s / b:>12.2f} {s / m:>13.2f}")
    print(f"median efficiency: system/bare {statistics.median(s / b for b, _, s in runs):.2f}, "
          f"system/model-only {statistics.median(s / m for _, m, s in runs):.2f}")


if __name__ == "__main__":
    main()
