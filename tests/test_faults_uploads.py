"""Accepted uploads survive a Redis that loses everything before any worker ran.

The webhook records each upload as a `pending` row before it answers 200; Redis is then
flushed, so the jobs are gone; a worker started afterwards runs the reconciler, which sends
the pending uploads again. Nobody runs a backfill.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from captioning.broker import create_app
from captioning.connections import redis_client
from captioning.embedded import free_port
from captioning.errors import DatabaseUnavailable
from captioning.messages import REALTIME_QUEUE
from captioning.reconcile import jobs_for, left_the_queue
from captioning.results import PENDING, CaptionRow, ResultsStore, utcnow
from captioning.settings import Settings
from producer.batcher import LingerBatcher
from producer.dedupe import Deduper
from producer.enqueue import JobSender
from producer.events import ObjectRef
from producer.listeners import EventEnqueuer, WebhookServer, pending_rows
from tests.conftest import settings_env
from tests.faults import RedisServer, Rig, wait_until
from tests.imagefactory import photo_bytes

pytestmark = pytest.mark.timeout(300)

SECRET = "uploads-secret"


@pytest.fixture
def fast_settings(settings: Settings, broker: RedisServer) -> Settings:
    return settings.model_copy(update={"broker_url": broker.url, "pending_requeue_after_s": 3})


@pytest.fixture
def webhook_port(fast_settings: Settings) -> Iterator[int]:
    client = redis_client(fast_settings.broker_url)
    with JobSender(create_app(fast_settings), REALTIME_QUEUE) as sender:
        enqueuer = EventEnqueuer(sender, Deduper(client), fast_settings, batch_size=8)
        batcher = LingerBatcher(enqueuer, batch_size=8, linger_s=0.05)
        server = WebhookServer(("127.0.0.1", 0), batcher, secret=SECRET,
                               socket_timeout_s=fast_settings.webhook_timeout_s)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield server.server_address[1]
        server.shutdown()
        server.server_close()
        batcher.close()


@pytest.fixture
def rig(
    fast_settings: Settings, broker: RedisServer, results: ResultsStore, tmp_path: Path
) -> Iterator[Rig]:
    rig = Rig(fast_settings, broker, results, settings_env(fast_settings), tmp_path,
              create_app(fast_settings))
    yield rig
    for worker in rig.workers:
        worker.kill_all()


def captioner(rig: Rig, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "cli", *args], env=rig.env,
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def post_upload(port: int, bucket: str, key: str, etag: str) -> int:
    record = {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
              "s3": {"bucket": {"name": bucket}, "object": {"key": key, "eTag": etag}}}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/", body=json.dumps({"Records": [record]}),
                       headers={"Authorization": f"Bearer {SECRET}"})
    status = connection.getresponse().status
    connection.close()
    return status


def test_accepted_uploads_end_with_one_ok_row_after_redis_is_flushed(
    s3, rig: Rig, webhook_port: int, prefix: str
) -> None:
    results = rig.results
    photos = list(photo_bytes().values())
    uris = []
    for n in range(50):
        key = f"{prefix}{n:02d}.jpg"
        etag = s3.put_object(Bucket="photos", Key=key, Body=photos[n % len(photos)])["ETag"]
        assert post_upload(webhook_port, "photos", key, etag) == 200
        uris.append(f"s3://photos/{key}")
    assert {r.status for r in results.rows(prefix=f"s3://photos/{prefix}")} == {PENDING}
    listed = captioner(rig, "results", "--status", "pending", "--format", "jsonl",
                       "--prefix", f"s3://photos/{prefix}")
    assert sorted(json.loads(line)["uri"] for line in listed.splitlines()) == uris
    assert json.loads(captioner(rig, "status", "--json"))["results"]["pending"] >= 50
    client = rig.client
    assert client.llen(REALTIME_QUEUE) > 0

    client.flushall()  # Redis loses everything before any worker took a job
    rig.start_worker()

    def all_ok() -> list[CaptionRow] | None:
        rows = results.rows(prefix=f"s3://photos/{prefix}")
        return rows if [r.status for r in rows] == ["ok"] * 50 else None

    rows = wait_until(all_ok, 180, "50 ok rows", every=0.5)
    assert all(r.attempts == 1 for r in rows)
    assert sorted(r.uri for r in rows) == uris
    log = rig.workers[0].log()
    assert "accepted uploads had no result" in log
    assert "Redis keeps nothing on disk" in log  # tests/faults.py runs it without persistence


def test_a_result_under_another_etag_settles_the_pending_row(
    fast_settings: Settings, results: ResultsStore, prefix: str
) -> None:
    """An event without an etag records '' and the worker writes the real one: the pending
    row must go, not be sent again forever."""
    ref = ObjectRef(bucket="photos", key=f"{prefix}no-etag.jpg")
    (pending,) = pending_rows([ref], {"caption": fast_settings.model}, "")
    results.record_pending([pending])
    later = utcnow() + timedelta(seconds=1)
    result = CaptionRow(**{**pending.__dict__, "etag": "abc", "status": "ok", "caption": "x",
                           "finished_at": later, "attempts": 1})
    results.upsert([result])
    assert results.settle_pending() >= 1
    assert [(r.status, r.etag) for r in results.rows(prefix=ref.uri)] == [("ok", "abc")]


def test_pending_rows_hide_from_skip_existing_and_never_overwrite_a_result(
    fast_settings: Settings, results: ResultsStore, prefix: str
) -> None:
    done, waiting = (ObjectRef(bucket="photos", key=f"{prefix}{n}.jpg", etag="e") for n in "ab")
    rows = pending_rows([done, waiting], {"caption": fast_settings.model}, "")
    results.upsert([CaptionRow(**{**rows[0].__dict__, "status": "ok", "attempts": 1})])
    results.record_pending(rows)
    by_uri = {r.uri: r for r in results.rows(prefix=f"s3://photos/{prefix}")}
    assert (by_uri[done.uri].status, by_uri[waiting.uri].status) == ("ok", PENDING)
    assert results.existing_ids([r.row_id for r in rows]) == {rows[0].row_id}


def test_the_reconciler_sends_only_what_has_left_the_queue() -> None:
    now = utcnow()
    handed = now - timedelta(seconds=600)
    assert left_the_queue(handed, oldest_waiting_s=0.0, waiting=0, now=now)
    assert left_the_queue(handed, oldest_waiting_s=60.0, waiting=5, now=now)
    assert not left_the_queue(handed, oldest_waiting_s=900.0, waiting=5, now=now)
    refs = [ObjectRef("b", f"k{n}", "e") for n in range(70)]
    jobs = jobs_for(pending_rows(refs, {"caption": "m"}, "p"), 32)
    assert [len(job.items) for job in jobs] == [32, 32, 6]
    assert {(job.model, job.prompt, job.source) for job in jobs} == {("m", "p", "event")}
    # A job asking for two kinds left two pending rows per image; each comes back alone,
    # keyed as the worker keys it (tags rows have no prompt).
    both = pending_rows(refs[:2], {"caption": "m", "tags": "t"}, "p")
    assert sorted((r.kind, r.model, r.prompt) for r in both) == [
        ("caption", "m", "p"), ("caption", "m", "p"), ("tags", "t", ""), ("tags", "t", "")]
    assert sorted((tuple(job.annotators.items()), len(job.items)) for job in jobs_for(both, 32)) \
        == [((("caption", "m"),), 2), ((("tags", "t"),), 2)]


def test_an_upload_that_cannot_be_recorded_is_not_acknowledged(
    fast_settings: Settings, broker: RedisServer
) -> None:
    """Database down: the flush fails (webhook 503, SQS message kept), nothing is queued, and
    the dedupe claim is released so the sender's retry is not dropped."""
    unreachable = fast_settings.model_copy(
        update={"database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/none"})
    client = broker.client()
    ref = ObjectRef(bucket="photos", key="down.jpg", etag="e1")
    with JobSender(create_app(unreachable), REALTIME_QUEUE) as sender:
        enqueuer = EventEnqueuer(sender, Deduper(client), unreachable, batch_size=8)
        with pytest.raises(DatabaseUnavailable):
            enqueuer([ref])
    assert client.llen(REALTIME_QUEUE) == 0
    assert Deduper(client).claim([ref]) == [ref]
