"""Ingest on real services: SQS (moto server) and webhook listeners, paced and resumable
backfills against SeaweedFS, and `captioner status`."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote_plus

import boto3
import pytest
import redis
from moto.server import ThreadedMotoServer

from captioning.broker import create_app
from captioning.checkpoints import Checkpoint, Checkpoints
from captioning.embedded import free_port
from captioning.kinds import KINDS
from captioning.messages import CaptionJob
from captioning.queues import job_of
from captioning.results import CaptionRow, ResultsStore
from captioning.settings import Settings
from captioning.storage import S3Store
from captioning.uris import parse_prefix
from captioning.wire import expand
from producer.backfill import Pacing, backfill
from producer.batcher import LingerBatcher
from producer.dedupe import Deduper
from producer.enqueue import JobSender
from producer.listeners import EventEnqueuer, SqsListener, WebhookServer
from producer.pacing import QueueGate
from tests.conftest import settings_env
from tests.imagefactory import photo_bytes

RowsUnder = Callable[..., list[CaptionRow]]
SECRET = "s3cret-for-tests"
WEBHOOK_TIMEOUT_S = 2.0


@pytest.fixture(scope="session")
def sqs_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def sqs(sqs_endpoint: str):
    return boto3.client("sqs", endpoint_url=sqs_endpoint)


@pytest.fixture
def test_queue(settings: Settings) -> Iterator[str]:
    """A Redis list no worker consumes, so tests can read exactly what was enqueued."""
    name = f"captions.test.{uuid.uuid4().hex[:8]}"
    yield name
    redis.Redis.from_url(settings.broker_url).delete(name)


def queued_jobs(settings: Settings, queue: str) -> list[dict[str, object]]:
    raw = redis.Redis.from_url(settings.broker_url).lrange(queue, 0, -1)
    jobs = (job_of(message) for message in reversed(raw))
    return [expand(job) for job in jobs if job is not None]  # type: ignore[misc]


def queued_uris(settings: Settings, queue: str) -> list[str]:
    return [i["uri"] for job in queued_jobs(settings, queue) for i in job["items"]]  # type: ignore[index,union-attr]


def s3_event(bucket: str, key: str, etag: str, name: str = "ObjectCreated:Put") -> str:
    record = {
        "eventSource": "aws:s3", "eventName": name,
        "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(key), "eTag": etag}},
    }
    return json.dumps({"Records": [record]})


@pytest.mark.usefixtures("worker")
def test_sqs_listener_captions_an_upload_once_and_deletes_its_messages(
    settings: Settings, s3, sqs, prefix: str, rows_under: RowsUnder
) -> None:
    queue_url = sqs.create_queue(QueueName=f"uploads-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    key = f"{prefix}new upload+1 é.jpg"
    etag = s3.put_object(Bucket="uploads", Key=key, Body=photo_bytes()["rocket.jpg"])["ETag"]
    event = s3_event("uploads", key, etag)
    for body in (
        json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"}),
        event,
        event,  # at-least-once: the same event again
        s3_event("uploads", f"{prefix}notes.txt", "x"),
        s3_event("uploads", key, etag, "ObjectRemoved:Delete"),
    ):
        sqs.send_message(QueueUrl=queue_url, MessageBody=body)

    listener = subprocess.Popen(
        [sys.executable, "-m", "cli", "listen", "sqs", "--queue-url", queue_url,
         "--endpoint-url", sqs.meta.endpoint_url],
        env=settings_env(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        # The listener records the upload as pending first; the worker's row replaces it.
        wait_until(lambda: [r.status for r in rows_under(f"s3://uploads/{prefix}", 1)] == ["ok"],
                   timeout=60)
        rows = rows_under(f"s3://uploads/{prefix}", 1)
        assert [(r.key, r.status, r.etag) for r in rows] == [(key, "ok", etag.strip('"'))]
        wait_until(lambda: queue_size(sqs, queue_url) == 0, timeout=20)
    finally:
        listener.send_signal(signal.SIGTERM)
        output, _ = listener.communicate(timeout=40)
    assert listener.returncode == 0, output
    assert "1 images in 1 jobs, 1 duplicates dropped" in output
    time.sleep(1)
    assert [r.attempts for r in rows_under(f"s3://uploads/{prefix}", 1)] == [1]


def test_sqs_messages_stay_when_the_enqueue_fails(sqs) -> None:
    queue_url = sqs.create_queue(
        QueueName=f"fail-{uuid.uuid4().hex[:8]}", Attributes={"VisibilityTimeout": "1"}
    )["QueueUrl"]
    sqs.send_message(QueueUrl=queue_url, MessageBody=s3_event("uploads", "a.jpg", "e"))

    def broken(_refs: object) -> None:
        raise ConnectionError("redis down")

    batcher = LingerBatcher(broken, batch_size=4, linger_s=0.01)
    listener = SqsListener(sqs, queue_url, batcher, receivers=1, wait_s=1)
    thread = threading.Thread(target=listener.run)
    thread.start()
    time.sleep(2.5)
    listener.stopping.set()
    thread.join(timeout=10)
    assert queue_size(sqs, queue_url) == 1


def queue_size(sqs, queue_url: str) -> int:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)
    return sum(int(attributes["Attributes"][name]) for name in names)


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


@pytest.fixture
def webhook(
    settings: Settings, test_queue: str, results: ResultsStore  # where uploads are recorded
) -> Iterator[tuple[int, str]]:
    client = redis.Redis.from_url(settings.broker_url)
    with JobSender(create_app(settings), test_queue) as sender:
        enqueuer = EventEnqueuer(sender, Deduper(client, ttl_s=60), settings, batch_size=8)
        batcher = LingerBatcher(enqueuer, batch_size=8, linger_s=0.2)
        server = WebhookServer(
            ("127.0.0.1", 0), batcher, secret=SECRET, max_body_bytes=4096,
            socket_timeout_s=WEBHOOK_TIMEOUT_S,
        )
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield server.server_address[1], test_queue
        server.shutdown()
        server.server_close()
        batcher.close()


def post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/minio/events", body=body, headers=headers)
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read() or b"{}")
    connection.close()
    return status, payload


def oversized_post(port: int, secret: str) -> bytes:
    """Announce a body over the limit and send none: the server must refuse on the header
    alone (sending the body too would race the server's close into a TCP reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n"
            + f"X-Captioner-Secret: {secret}\r\n\r\n".encode()
        )
        return sock.recv(100)


def test_webhook_checks_the_secret_and_size_and_answers_after_the_enqueue(
    settings: Settings, webhook: tuple[int, str], prefix: str
) -> None:
    port, queue = webhook
    event = s3_event("uploads", f"{prefix}a b.jpg", '"e1"').encode()
    assert post(port, event, {})[0] == 401
    assert post(port, event, {"X-Captioner-Secret": "wrong"})[0] == 401
    assert queued_jobs(settings, queue) == []
    bearer = {"Authorization": f"Bearer {SECRET}"}
    assert oversized_post(port, SECRET).startswith(b"HTTP/1.1 413")
    assert post(port, b"{not json", bearer)[0] == 400

    assert post(port, event, bearer) == (200, {"images": 1})
    jobs = queued_jobs(settings, queue)  # already there: 200 means enqueued
    assert [(job["source"], job["items"]) for job in jobs] == [
        ("event", [{"uri": f"s3://uploads/{prefix}a b.jpg", "etag": "e1", "version_id": None}])
    ]
    CaptionJob.from_message(jobs[0])
    assert post(port, event, {"X-Captioner-Secret": SECRET})[0] == 200  # a redelivery
    assert len(queued_jobs(settings, queue)) == 1


def test_webhook_drops_a_stalled_client_and_keeps_accepting_uploads(
    settings: Settings, webhook: tuple[int, str], prefix: str
) -> None:
    port, queue = webhook
    bearer = {"Authorization": f"Bearer {SECRET}"}
    event = s3_event("uploads", f"{prefix}a.jpg", '"e1"').encode()
    patience = WEBHOOK_TIMEOUT_S * 5  # a server that never drops them fails the recv below
    with (
        socket.create_connection(("127.0.0.1", port), timeout=patience) as stalled,
        socket.create_connection(("127.0.0.1", port), timeout=patience) as idle,
    ):
        stalled.sendall(  # headers promising a body that never comes
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
            + f"Authorization: Bearer {SECRET}\r\n\r\n".encode()
        )
        assert post(port, event, bearer) == (200, {"images": 1})  # others are served meanwhile
        assert stalled.recv(100) == b""  # closed by the server, no answer
        assert idle.recv(100) == b""  # a connection that never sent a byte goes too
    assert post(port, event, bearer)[0] == 200  # a redelivery, still served
    assert len(queued_jobs(settings, queue)) == 1


def test_webhook_groups_a_burst_of_uploads_into_few_jobs(
    settings: Settings, webhook: tuple[int, str], prefix: str
) -> None:
    port, queue = webhook
    headers = {"X-Captioner-Secret": SECRET}
    bodies = [s3_event("uploads", f"{prefix}{n}.jpg", f"e{n}").encode() for n in range(20)]
    started = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda body: post(port, body, headers)[0], bodies))
    elapsed = time.monotonic() - started
    assert statuses == [200] * 20
    jobs = queued_jobs(settings, queue)
    assert sorted(queued_uris(settings, queue)) == sorted(
        f"s3://uploads/{prefix}{n}.jpg" for n in range(20)
    )
    assert all(len(job["items"]) <= 8 for job in jobs)  # type: ignore[arg-type]
    # 3 jobs when all 20 land within one linger; a loaded machine spreads them over a few.
    assert len(jobs) <= 10, [len(job["items"]) for job in jobs]  # type: ignore[arg-type]
    assert elapsed < 10


def upload_many(s3, bucket: str, keys: list[str]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket=bucket, Key=key, Body=b"x"), keys))


class InterruptedSender(JobSender):
    """Ctrl-C at the worst moment: right after a job reached Redis, before its checkpoint."""

    def __init__(self, *args: object, after_jobs: int) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self._after_jobs = after_jobs

    def send(self, job: CaptionJob) -> None:
        super().send(job)
        if self.jobs_sent == self._after_jobs:
            raise KeyboardInterrupt


def test_backfill_resumes_after_an_interruption_resending_at_most_one_job(
    settings: Settings, s3, prefix: str, test_queue: str
) -> None:
    keys = [f"{prefix}{n:03d}.jpg" for n in range(50)] + [f"{prefix}{n:03d}.txt" for n in range(5)]
    upload_many(s3, "photos", keys)
    source = parse_prefix(f"s3://photos/{prefix}")
    checkpoints = Checkpoints(redis.Redis.from_url(settings.broker_url))
    app = create_app(settings)

    def run(sender: JobSender, checkpoint: Checkpoint) -> Checkpoint:
        return backfill(
            source, list_pages=S3Store(settings).list, results=None, sender=sender,
            settings=settings, batch_size=8, checkpoint=checkpoint, checkpoints=checkpoints,
        )

    name = f"test-{prefix}"
    with pytest.raises(KeyboardInterrupt), InterruptedSender(app, test_queue, after_jobs=3) as s:
        run(s, Checkpoint(name=name, source=source.uri))
    saved = checkpoints.get(name)
    assert saved is not None and not saved.finished
    assert saved.last_key == f"{prefix}015.jpg" and saved.enqueued == 16

    with JobSender(app, test_queue) as sender:
        done = run(sender, saved)
    assert done.finished and done.enqueued == 50 and done.jobs == 7  # checkpointed work
    uris = queued_uris(settings, test_queue)
    assert set(uris) == {f"s3://photos/{k}" for k in keys if k.endswith(".jpg")}
    assert len(uris) - len(set(uris)) == 8  # the one job in flight at the interruption


def test_max_queue_depth_pauses_listing_until_workers_drain(
    settings: Settings, s3, prefix: str, test_queue: str
) -> None:
    upload_many(s3, "photos", [f"{prefix}{n:03d}.png" for n in range(64)])
    client = redis.Redis.from_url(settings.broker_url)
    gate = QueueGate(client, test_queue, max_images=12, images_per_job=4)
    depths: list[int] = []
    popped: list[bytes] = []
    stop = threading.Event()

    def drain() -> None:  # a slow stand-in for workers
        while not stop.is_set():
            depths.append(int(client.llen(test_queue)))
            if (raw := client.rpop(test_queue)) is not None:
                popped.append(raw)
            time.sleep(0.05)

    drainer = threading.Thread(target=drain)
    drainer.start()
    with JobSender(create_app(settings), test_queue) as sender:
        report = backfill(
            parse_prefix(f"s3://photos/{prefix}"), list_pages=S3Store(settings).list,
            results=None, sender=sender, settings=settings, batch_size=4,
            checkpoint=Checkpoint(name=prefix, source=prefix), pacing=Pacing(gate=gate),
        )
    wait_until(lambda: client.llen(test_queue) == 0, timeout=10)
    stop.set()
    drainer.join()
    assert report.enqueued == 64 and len(popped) == 16
    assert max(depths) * 4 <= 12
    assert gate.paused_s > 0.3


def captioner(settings: Settings, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args], env=settings_env(settings),
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.usefixtures("worker")
def test_backfill_cli_since_match_limit_resume_and_status(
    settings: Settings, s3, prefix: str
) -> None:
    keys = [f"{prefix}2024-0{m}/{n}.jpg" for m in (1, 2) for n in range(5)]
    upload_many(s3, "photos", [*keys, f"{prefix}2024-01/skip.txt"])
    source = f"s3://photos/{prefix}"

    matched = captioner(settings, "backfill", source, "--dry-run", "--match", "2024-02/*")
    assert "listed 11 objects, 5 images" in matched
    future = captioner(settings, "backfill", source, "--dry-run", "--since", "2999-01-01")
    assert "listed 11 objects, 0 images" in future
    past = captioner(settings, "backfill", source, "--dry-run", "--since", "2000-01-01T00:00")
    assert "listed 11 objects, 10 images" in past

    name = f"cli-{prefix}"
    first = captioner(settings, "backfill", source, "--name", name, "--limit", "4",
                      "--batch-size", "2", "--no-skip-existing", "--rate", "1000/s")
    assert "enqueued 4 images in 2 jobs" in first and "--resume" in first
    rest = captioner(settings, "backfill", source, "--name", name, "--resume",
                     "--batch-size", "2", "--no-skip-existing", "--max-queue-depth", "1000")
    assert "enqueued 10 images in 5 jobs" in rest and "--resume" not in rest

    status = json.loads(captioner(settings, "status", "--json", "--window", "10"))
    assert set(status["queues"]) == {"captions.realtime", "captions.bulk",
                                     *(f"captions.kind.{kind}" for kind in KINDS)}
    assert {"jobs", "images", "oldest_age_s"} <= set(status["queues"]["captions.bulk"])
    assert status["workers"], "the session's worker should answer the ping"
    checkpoint = next(b for b in status["backfills"] if b["name"] == name)
    assert checkpoint["finished"] and checkpoint["enqueued"] == 10
    assert checkpoint["last_key"] == f"{prefix}2024-02/4.jpg"
    assert {"ok", "failed", "per_second", "window_s"} <= set(status["results"])
    assert "workers online: 1" in captioner(settings, "status")
