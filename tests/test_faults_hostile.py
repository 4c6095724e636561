"""Hostile input and hostile configuration: what anyone who can write to Redis or a bucket can
send, the byte cap on the wire, dead letters end to end, and secrets and TLS in the settings."""

from __future__ import annotations

import json
import os
import pickle
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import text

from captioning.broker import celery_config, create_app
from captioning.connections import redis_client
from captioning.deadletters import DeadLetters
from captioning.errors import ImageTooLarge, ObjectMissing, WorkerLost
from captioning.keys import DEAD_QUEUE
from captioning.messages import BULK_QUEUE, TASK_NAME, CaptionJob, JobItem
from captioning.results import ResultsStore
from captioning.settings import Settings
from captioning.storage import FileStore, S3Store
from captioning.uris import allowed_location, parse_uri
from tests.conftest import settings_env
from tests.faults import (
    CountingProxy,
    PrivatePostgres,
    RedisServer,
    Rig,
    Worker,
    make_tls_files,
    one_row_each,
    put,
    wait_until,
    worker_env,
)
from tests.imagefactory import photo_bytes
from tests.services import SeaweedS3
from workers.delivery import lost_rows, split_job

pytestmark = pytest.mark.timeout(240)


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


class Exploit:
    """Unpickling this creates a file: proof that pickle was (or was not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def publish_raw(app: Celery, body: bytes | str, content_type: str) -> None:
    headers = {"task": TASK_NAME, "id": uuid.uuid4().hex, "lang": "py", "retries": 0}
    with app.producer_or_acquire() as producer:
        producer.publish(body, routing_key=BULK_QUEUE, exchange="", headers=headers,
                         content_type=content_type, content_encoding="binary")


def test_pickle_and_other_non_json_payloads_are_refused(
    settings: Settings, s3, prefix: str, rows_under, worker
) -> None:
    app = create_app(settings)
    marker = Path(settings.allowed_roots[0]) / f"pwned-{uuid.uuid4().hex}"
    publish_raw(app, pickle.dumps(((Exploit(marker),), {}, {})), "application/x-python-serialize")
    publish_raw(app, b"!!python/object/apply:os.system ['true']", "application/x-yaml")
    publish_raw(app, b"\x00\xffnot json at all{", "application/json")
    redis.Redis.from_url(settings.broker_url).lpush(BULK_QUEUE, b"not even a kombu envelope")
    uris = put(s3, prefix, {"after.png": photo_bytes()["coffee.png"]})
    app.send_task(TASK_NAME, args=[CaptionJob(items=(JobItem(uri=uris[0]),),
                                              model=settings.model, source="cli").to_message()],
                  queue=BULK_QUEUE)

    rows = rows_under(uris[0], 1)
    assert [r.status for r in rows] == ["ok"]
    assert worker.poll() is None
    assert not marker.exists()


@pytest.mark.usefixtures("worker")
def test_malformed_jobs_are_dead_lettered_with_a_reason(settings: Settings) -> None:
    app = create_app(settings)
    letters = DeadLetters(redis_client(settings.broker_url))
    before = len(letters)
    good = CaptionJob(items=(JobItem(uri="s3://forbidden/x.jpg"),), model=settings.model,
                      source="cli").to_message()
    malformed = [
        ([{"items": "nope", "model": "m", "source": "cli"}], {}),
        (["a string"], {}),
        ([], {}),
        ([good, good], {}),
        ([good], {"extra": 1}),
        ([{**good, "prompt": "x" * 100_000}], {}),
        ([{**good, "items": [{"uri": "s3://photos/a.jpg"}] * 5000}], {}),
    ]
    for args, kwargs in malformed:
        app.send_task(TASK_NAME, args=args, kwargs=kwargs, queue=BULK_QUEUE)

    wait_until(lambda: len(letters) >= before + len(malformed), 60, "dead letters")
    reasons = [letter.reason for letter in letters.list(1000)[-len(malformed):]]
    assert sum("CaptionJob:" in r or "JSON object" in r for r in reasons) == 4, reasons
    assert sum("exactly one argument" in r for r in reasons) == 3, reasons


@pytest.mark.usefixtures("worker")
def test_a_job_over_the_item_limit_is_split_not_refused(
    settings: Settings, prefix: str, rows_under
) -> None:
    uris = [f"s3://forbidden/{prefix}{i}.jpg" for i in range(settings.max_job_items + 10)]
    job = CaptionJob(items=tuple(JobItem(uri=u) for u in uris), model=settings.model,
                     source="cli")
    create_app(settings).send_task(TASK_NAME, args=[job.to_message()], queue=BULK_QUEUE)
    rows = rows_under(f"s3://forbidden/{prefix}", len(uris))
    assert len(rows) == len(uris)
    assert {r.error.split(":")[0] for r in rows} == {"UriRefused"}


def test_objects_over_the_byte_cap_are_never_downloaded_in_full(
    settings: Settings, seaweed: SeaweedS3, s3, prefix: str
) -> None:
    size, cap = 5_000_000, 100_000
    s3.put_object(Bucket="photos", Key=f"{prefix}big.jpg", Body=b"\xff\xd8\xff" + b"\0" * size)
    proxy = CountingProxy(seaweed.s3_port)
    store = S3Store(settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{proxy.port}"}))
    location = parse_uri(f"s3://photos/{prefix}big.jpg")
    try:
        with pytest.raises(ImageTooLarge, match="5,000,003 bytes"):
            store.get(location, max_bytes=cap)
        refused = proxy.bytes_from_upstream
        assert len(store.get(location, max_bytes=size * 2).data) == size + 3
    finally:
        proxy.close()
    assert refused < cap + 16_384  # the capped range and headers, not 5 MB
    assert proxy.bytes_from_upstream > size  # the relay does see a full download


def test_dead_letters_end_to_end_list_requeue_purge(
    settings: Settings, s3, prefix: str, tmp_path: Path
) -> None:
    broker = RedisServer(tmp_path / "redis").start()
    try:
        no_database = settings.database_url.rsplit("/", 1)[0] + "/captioner_no_such_database"
        broken = settings.model_copy(update={"broker_url": broker.url,
                                             "database_url": no_database})
        env = worker_env(settings_env(broken), max_job_retries=1, retry_backoff_max_s=1)
        results = ResultsStore(settings.database_url)
        rig = Rig(broken, broker, results, env, tmp_path, create_app(broken))
        uris = put(s3, prefix, {"a.png": photo_bytes()["coffee.png"]})
        rig.start_worker()
        rig.send(uris, f"dead-{uuid.uuid4().hex}")
        letters = DeadLetters(broker.client())
        wait_until(lambda: len(letters) == 1, 60, "the job to be dead-lettered")
        letters.push({"items": "garbage"}, reason="hand-written", queue=BULK_QUEUE)
        rig.workers.pop().stop()

        listed = [json.loads(line) for line in run_cli(env, "dead", "list").stdout.splitlines()]
        assert [letter["queue"] for letter in listed] == [BULK_QUEUE, BULK_QUEUE]
        assert listed[0]["reason"].startswith("DatabaseUnavailable")
        assert CaptionJob.from_message(listed[0]["payload"]).items == (JobItem(uri=uris[0]),)

        fixed = worker_env(settings_env(settings.model_copy(update={"broker_url": broker.url})))
        rig.env = fixed
        rig.start_worker()
        replay = run_cli(fixed, "dead", "requeue")
        assert "requeued 1 jobs" in replay.stdout and "kept 1" in replay.stdout
        assert one_row_each(results, uris, timeout=60)[uris[0]].status == "ok"
        assert "purged 1" in run_cli(fixed, "dead", "purge").stdout
        assert broker.client().llen(DEAD_QUEUE) == 0
    finally:
        for worker in rig.workers:
            worker.kill_all()
        broker.kill()


def test_rediss_without_options_verifies_the_server_certificate() -> None:
    assert celery_config(Settings(broker_url="rediss://:pw@cache:6380/0"))["broker_use_ssl"] == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED
    }
    with_query = "rediss://cache:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem"
    assert celery_config(Settings(broker_url=with_query))["broker_use_ssl"] is None
    assert celery_config(Settings(broker_url="redis://cache:6379/0"))["broker_use_ssl"] is None


@pytest.fixture
def tls_services(tmp_path: Path) -> Iterator[tuple[RedisServer, PrivatePostgres, Path]]:
    tls = make_tls_files(tmp_path / "tls")
    broker = RedisServer(tmp_path / "redis", password=f"redis-{uuid.uuid4().hex}", tls=tls)
    database = PrivatePostgres(tls=tls).init()
    broker.start()
    database.start()
    yield broker, database, tls.ca
    broker.kill()
    database.destroy()


def test_password_and_tls_redis_and_postgres_work_and_no_secret_is_logged(
    settings: Settings, s3, prefix: str, tmp_path: Path,
    tls_services: tuple[RedisServer, PrivatePostgres, Path],
) -> None:
    broker, database, ca = tls_services
    db_password = f"pg-{uuid.uuid4().hex}"
    database_url = (f"postgresql://postgres:{db_password}@127.0.0.1:{database.port}/postgres"
                    f"?sslmode=verify-full&sslrootcert={ca}")
    secure = settings.model_copy(update={"broker_url": broker.url, "database_url": database_url})
    env = settings_env(secure)
    results = ResultsStore(database_url)
    results.create_schema()
    with results.engine.connect() as conn:
        assert conn.execute(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                            ).scalar() is True
    worker = Worker(env, tmp_path / "worker.log").start()
    try:
        uris = put(s3, prefix, {"a.png": photo_bytes()["coffee.png"]})
        outputs = [run_cli(env, "enqueue", *uris)]
        assert one_row_each(results, uris, timeout=60)[uris[0]].status == "ok"
        outputs += [run_cli(env, "status"), run_cli(env, "dead", "list")]
        assert all(o.returncode == 0 for o in outputs), [o.stderr for o in outputs]
        wrong_url = broker.url.replace(broker.password, "nope-" + db_password)
        wrong = {**env, "CAPTIONER_BROKER_URL": wrong_url}
        outputs.append(run_cli(wrong, "status"))
        assert outputs[-1].returncode != 0
        bare = {**env, "CAPTIONER_BROKER_URL": broker.url.split("?")[0]}  # no CA: must not trust
        outputs.append(run_cli(bare, "dead", "list"))
        assert outputs[-1].returncode != 0
        assert "certificate verify failed" in outputs[-1].stderr
    finally:
        worker.stop()
        results.dispose()
    text_seen = worker.log() + "".join(o.stdout + o.stderr for o in outputs)
    assert broker.password not in text_seen
    assert db_password not in text_seen


def test_a_fifo_under_an_allowed_root_does_not_hang_the_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "trap.jpg"
    os.mkfifo(fifo)
    location = allowed_location(fifo.as_uri(), Settings(allowed_roots=(tmp_path,)))
    with pytest.raises(ObjectMissing, match="not a regular file"):
        FileStore().get(location, max_bytes=1000)  # would block forever on open() otherwise


def test_delivery_arithmetic_and_poison_helpers() -> None:
    defaults = Settings()
    assert defaults.job_deadline_s == 256 * 3 + 60
    assert defaults.visibility_timeout_s == 1185  # (828 + 120) x 1.25
    assert celery_config(defaults)["task_time_limit"] == defaults.job_deadline_s
    assert Settings(job_time_limit_s=100, retry_backoff_max_s=20).visibility_timeout_s == 150
    job = CaptionJob(items=tuple(JobItem(uri=f"s3://b/{i}.jpg") for i in range(5)), model="m",
                     source="cli", enqueued_at=1.0)
    parts = list(split_job(job, 2))
    assert [len(p.items) for p in parts] == [2, 2, 1]
    assert {(p.model, p.enqueued_at) for p in parts} == {("m", 1.0)}
    rows = lost_rows(parts[2], WorkerLost("died twice"), "w1")
    assert [(r.status, r.error, r.bucket, r.key) for r in rows] == [
        ("failed", "WorkerLost: died twice", "b", "4.jpg")
    ]
