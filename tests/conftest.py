"""Session fixtures: real Redis and PostgreSQL on 127.0.0.1, SeaweedFS S3 on free ports, and a
worker process running the tiny BLIP-2. Nothing is mocked; missing services are an error."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from captioning.broker import create_app
from captioning.embedded import PrivateRedis, free_port
from captioning.messages import CaptionJob, JobItem
from captioning.results import CaptionRow, ResultsStore
from captioning.settings import Settings
from producer.enqueue import JobSender
from tests.faults import RedisServer
from tests.services import SeaweedS3

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
ALLOWED_BUCKETS = ("photos", "uploads")
FORBIDDEN_BUCKET = "forbidden"
PHOTOS_DIR = Path(__file__).resolve().parent.parent / "captioning" / "samples"

os.environ.setdefault("AWS_ACCESS_KEY_ID", "captioner-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "captioner-test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        raise RuntimeError(f"Redis is not running at {REDIS_URL}: start it (see .ci/run)") from exc
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    name = f"captioner_test_{os.getpid()}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True)
    except psycopg.OperationalError as exc:
        raise RuntimeError(f"PostgreSQL is not running at {POSTGRES_ADMIN_URL}") from exc
    with admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    client = server.client()
    for bucket in (*ALLOWED_BUCKETS, FORBIDDEN_BUCKET):
        client.create_bucket(Bucket=bucket)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(seaweed: SeaweedS3):
    return seaweed.client()


@pytest.fixture(scope="session")
def local_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("local-images").resolve()


@pytest.fixture(scope="session")
def settings(
    redis_url: str, postgres_url: str, seaweed: SeaweedS3, local_root: Path
) -> Settings:
    return Settings(
        broker_url=redis_url,
        database_url=postgres_url,
        s3_endpoint_url=seaweed.endpoint,
        allowed_buckets=ALLOWED_BUCKETS,
        allowed_roots=(local_root,),
        results_uri="s3://uploads/captions",
        model="tiny-random-blip2",
        batch_size=4,
        max_new_tokens=8,
        max_image_bytes=2_000_000,
        max_image_pixels=20_000_000,
        metrics_port=free_port(),
    )


def settings_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **settings.as_env()}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server per test (no AOF, no RDB snapshots), free to flush or kill:
    what one test leaves unacked must not count in the next."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def results(settings: Settings) -> Iterator[ResultsStore]:
    store = ResultsStore(settings.database_url)
    store.create_schema()
    yield store
    store.dispose()


@pytest.fixture(scope="session")
def worker(
    settings: Settings, results: ResultsStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen[bytes]]:
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--loglevel", "INFO"],
            env=settings_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait_for_log(log_path, "ready", process, timeout=120)
    yield process
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def wait_for_log(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not become {text!r}:\n{path.read_text()[-4000:]}")
        time.sleep(0.2)


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test, so tests share buckets without seeing each other's rows."""
    return f"t-{uuid.uuid4().hex[:10]}/"


def wait_for_rows(
    results: ResultsStore, uri_prefix: str, expected: int, timeout: float = 90
) -> list[CaptionRow]:
    deadline = time.monotonic() + timeout
    while True:
        rows = results.rows(prefix=uri_prefix)
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.25)


@pytest.fixture
def rows_under(results: ResultsStore) -> Callable[..., list[CaptionRow]]:
    return lambda uri_prefix, expected, timeout=90: wait_for_rows(
        results, uri_prefix, expected, timeout
    )


def scrape(port: int) -> dict[str, float]:
    """name{labels} -> value, for every sample on a /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def send_backlog(broker_url: str, sizes: dict[str, list[int]]) -> None:
    """Queue jobs of the given sizes (images per job) without any worker consuming them."""
    app = create_app(Settings(broker_url=broker_url))
    for queue, jobs in sizes.items():
        with JobSender(app, queue) as sender:
            for size in jobs:
                items = tuple(JobItem(uri=f"s3://photos/{i}.jpg") for i in range(size))
                sender.send(CaptionJob(items=items, model="m", source="backfill"))


@pytest.fixture
def backlog_broker() -> Iterator[PrivateRedis]:
    with PrivateRedis() as broker:
        yield broker


@pytest.fixture
def exporter(backlog_broker: PrivateRedis) -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "exporter", "--port", str(port)],
        env={**settings_env(Settings()), "CAPTIONER_BROKER_URL": backlog_broker.url},
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            scrape(port)
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "exporter died"
            time.sleep(0.2)
    yield port
    process.terminate()
    process.wait(timeout=10)
