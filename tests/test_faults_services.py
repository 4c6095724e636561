"""Fault injection, services: object store, database and Redis go away mid-run and come back.

The services broken here are private instances (SeaweedFS, a PostgreSQL 15 cluster, a
redis-server) on free loopback ports; they come back on the same ports, as a restarted pod
behind a Service would, and nothing is told to reconnect.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from captioning.broker import create_app
from captioning.errors import StoreUnavailable
from captioning.results import ResultsStore
from captioning.settings import Settings
from captioning.storage import StoredObject, Stores
from captioning.uris import parse_uri
from tests.conftest import ALLOWED_BUCKETS, settings_env
from tests.faults import (
    CountingProxy,
    PrivatePostgres,
    RedisServer,
    Rig,
    one_row_each,
    put,
    worker_env,
)
from tests.imagefactory import photo_bytes
from tests.services import SeaweedS3
from workers.fetch import FETCH_ATTEMPTS, fetch_one

pytestmark = pytest.mark.timeout(240)

OUTAGE_S = 20


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-services")).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed-faults"))
    server.start()
    for bucket in ALLOWED_BUCKETS:
        server.client().create_bucket(Bucket=bucket)
    yield server
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)  # private and disposable: no need to wait


@pytest.fixture(scope="module")
def database() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres().init()
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="module")
def private_settings(
    settings: Settings, broker: RedisServer, store: SeaweedS3, database: PrivatePostgres
) -> Settings:
    return settings.model_copy(update={
        "broker_url": broker.url, "database_url": database.url,
        "s3_endpoint_url": store.endpoint, "retry_backoff_max_s": 4,
    })


@pytest.fixture
def rig(private_settings: Settings, broker: RedisServer, tmp_path: Path) -> Iterator[Rig]:
    results = ResultsStore(private_settings.database_url)
    results.create_schema()
    env = worker_env(settings_env(private_settings), retry_backoff_max_s=4)
    rig = Rig(private_settings, broker, results, env, tmp_path, create_app(private_settings))
    yield rig
    for worker in rig.workers:
        worker.kill_all()
    results.dispose()


def images(count: int) -> dict[str, bytes]:
    photos = list(photo_bytes().items())
    return {f"{i:03d}-{name}": data for i, (name, data) in
            zip(range(count), photos * (count // len(photos) + 1), strict=False)}


def send_in_jobs(rig: Rig, uris: list[str], size: int) -> None:
    for start in range(0, len(uris), size):
        rig.send(uris[start : start + size], f"job-{uuid.uuid4().hex}")


def wait_for_some_rows(rig: Rig, prefix: str, at_least: int = 1) -> None:
    deadline = time.monotonic() + 90
    while len(rig.results.rows(prefix=prefix)) < at_least:
        assert time.monotonic() < deadline, "no rows before the fault"
        time.sleep(0.1)


def sidecar_count(s3, prefix: str, expected: int, timeout: float = 60) -> int:
    """Sidecars under `prefix`, waiting for `expected`: they are put just after the rows."""
    deadline = time.monotonic() + timeout
    while True:
        count = s3.list_objects_v2(Bucket="uploads", Prefix=prefix)["KeyCount"]
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.5)


def test_object_store_outage_fails_no_image(store: SeaweedS3, rig: Rig, prefix: str) -> None:
    s3 = store.client()
    uris = put(s3, prefix, images(40))
    worker = rig.start_worker()
    send_in_jobs(rig, uris, 4)
    wait_for_some_rows(rig, f"s3://photos/{prefix}")

    store.stop()  # reads and sidecar writes both fail now
    time.sleep(OUTAGE_S)
    store.start()  # same S3 port, same data

    rows = one_row_each(rig.results, uris, timeout=150)
    assert {r.status for r in rows.values()} == {"ok"}, [r.error for r in rows.values()]
    assert "StoreUnavailable" in worker.log()  # the outage was met, and retried
    assert sidecar_count(s3, f"captions/photos/{prefix}", len(uris)) == len(uris)


def test_an_object_store_outage_costs_one_retry_layer_of_gets(
    settings: Settings, seaweed: SeaweedS3, s3, prefix: str
) -> None:
    """A GET is retried by workers/fetch.py alone (botocore's own retries used to multiply
    it 3 times); listings, with no retry loop of their own, keep botocore's 3 attempts."""
    uri = put(s3, prefix, {"a.png": photo_bytes()["coffee.png"]})[0]
    proxy = CountingProxy(seaweed.s3_port)
    stores = Stores(settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{proxy.port}"}))
    location, cap = parse_uri(uri), settings.max_image_bytes
    try:
        assert isinstance(fetch_one(stores, location, max_bytes=cap, version_id=None), StoredObject)
        with proxy.outage() as refused, pytest.raises(StoreUnavailable, match="SlowDown"):
            fetch_one(stores, location, max_bytes=cap, version_id=None)
        assert refused == {"GET": FETCH_ATTEMPTS}

        with proxy.outage() as refused, pytest.raises(StoreUnavailable, match="SlowDown"):
            list(stores.s3.list("photos", prefix))
        assert refused == {"GET": FETCH_ATTEMPTS + 3}

        fetched = fetch_one(stores, location, max_bytes=cap, version_id=None)
        assert isinstance(fetched, StoredObject) and len(fetched.data) > 0  # back after the outage
    finally:
        proxy.close()


def test_database_outage_holds_the_ack_until_written(
    database: PrivatePostgres, rig: Rig, store: SeaweedS3, prefix: str
) -> None:
    uris = put(store.client(), prefix, images(40))
    worker = rig.start_worker()
    send_in_jobs(rig, uris, 4)
    wait_for_some_rows(rig, f"s3://photos/{prefix}")

    database.stop()
    time.sleep(8)
    database.start()
    wait_for_some_rows(rig, f"s3://photos/{prefix}", at_least=20)
    with psycopg.connect(database.url, autocommit=True) as admin:  # kill every session
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'")

    rows = one_row_each(rig.results, uris, timeout=150)
    assert {r.status for r in rows.values()} == {"ok"}
    assert "DatabaseUnavailable" in worker.log()
    assert sum(r.attempts for r in rows.values()) >= len(uris)


def captioner(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_redis_restart_mid_backfill_then_backfill_again_completes(
    broker: RedisServer, rig: Rig, store: SeaweedS3, prefix: str
) -> None:
    uris = put(store.client(), prefix, images(60))
    source = f"s3://photos/{prefix}"
    rig.start_worker()
    first = captioner(rig.env, "backfill", source, "--batch-size", "2")
    assert first.returncode == 0, first.stderr
    wait_for_some_rows(rig, source, at_least=4)

    broker.kill()  # Redis keeps nothing on disk: every queued job is gone
    backfill = subprocess.Popen(  # a producer that starts while Redis is down
        [sys.executable, "-m", "cli", "backfill", source, "--batch-size", "2"],
        env=rig.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(3)
    broker.start()
    out, err = backfill.communicate(timeout=120)
    assert backfill.returncode == 0, err
    assert "enqueued" in out and "skipped" in out

    rows = one_row_each(rig.results, uris, timeout=150)
    assert {r.status for r in rows.values()} == {"ok"}
    again = captioner(rig.env, "backfill", source)
    assert f"skipped {len(uris)} already captioned; enqueued 0 images" in again.stdout
