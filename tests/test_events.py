"""Ingest logic that needs no services: event parsing, linger batching, pacing, filters."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from captioning.errors import InvalidEvent
from captioning.storage import ListedObject
from producer.backfill import Filters
from producer.batcher import BatcherClosed, LingerBatcher
from producer.events import ObjectRef, refs_from_event
from producer.pacing import RateLimiter


def s3_record(key: str, event: str = "ObjectCreated:Put", **obj: str) -> dict[str, object]:
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": event,
        "s3": {"bucket": {"name": "uploads"}, "object": {"key": key, "size": 10, **obj}},
    }


def test_s3_records_decode_keys_and_keep_identity() -> None:
    body = json.dumps({"Records": [
        s3_record("dir/with+space+%2B+plus/caf%C3%A9.jpg", eTag='"abc"', versionId="v1"),
        s3_record("b.PNG", "ObjectCreated:CompleteMultipartUpload", eTag="def"),
    ]})
    assert refs_from_event(body) == [
        ObjectRef("uploads", "dir/with space + plus/café.jpg", "abc", "v1"),
        ObjectRef("uploads", "b.PNG", "def", None),
    ]
    item = refs_from_event(body)[0].job_item()
    assert item.uri == "s3://uploads/dir/with space + plus/café.jpg" and item.etag == "abc"


def test_only_created_image_objects_count() -> None:
    body = {"Records": [
        s3_record("a.jpg", "ObjectRemoved:Delete"),
        s3_record("notes.txt"),
        s3_record("folder/"),
        s3_record("b.webp", "s3:ObjectCreated:Put"),  # MinIO spells it with the s3: prefix
    ]}
    assert [ref.key for ref in refs_from_event(body)] == ["b.webp"]


def test_test_events_are_ignored() -> None:
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "uploads"}
    assert refs_from_event(json.dumps(test_event)) == []


def test_eventbridge_and_sns_envelopes() -> None:
    bridge = {
        "version": "0", "source": "aws.s3", "detail-type": "Object Created",
        "detail": {"bucket": {"name": "uploads"},
                   "object": {"key": "x/a+b.jpg", "etag": "e1", "version-id": "v9"}},
    }
    assert refs_from_event(bridge) == [ObjectRef("uploads", "x/a b.jpg", "e1", "v9")]
    deleted = {**bridge, "detail-type": "Object Deleted"}
    assert refs_from_event(deleted) == []
    sns = {"Type": "Notification", "Message": json.dumps({"Records": [s3_record("c.jpg")]})}
    assert [ref.key for ref in refs_from_event(sns)] == ["c.jpg"]


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"hello": 1}', b'{"Records": "x"}',
     b'{"Records": [{"eventName": "ObjectCreated:Put"}]}',
     b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": ""},'
     b' "object": {"key": "a.jpg"}}}]}'],
)
def test_malformed_events_raise_invalid_event(body: bytes) -> None:
    with pytest.raises(InvalidEvent):
        refs_from_event(body)


def test_linger_batcher_groups_a_burst_and_flushes_a_lone_event_quickly() -> None:
    flushed: list[list[ObjectRef]] = []
    batcher = LingerBatcher(flushed.append, batch_size=8, linger_s=0.2)
    refs = [ObjectRef("b", f"{n}.jpg") for n in range(20)]
    futures = [batcher.submit([ref]) for ref in refs]
    for future in futures:
        future.result(timeout=5)
    # A burst that arrived while the flusher slept is taken at once (the enqueuer splits it
    # into jobs of batch_size); it never waits for the linger to run out.
    assert len(flushed) <= 3 and sum(len(batch) for batch in flushed) == 20

    flushed.clear()
    lone = LingerBatcher(flushed.append, batch_size=8, linger_s=0.05)
    started = time.monotonic()
    lone.submit([refs[0]]).result(timeout=5)
    assert time.monotonic() - started < 0.5 and flushed == [[refs[0]]]
    lone.close()
    with pytest.raises(BatcherClosed):
        lone.submit([refs[1]])
    batcher.close()


def test_linger_batcher_fails_every_future_of_a_failed_flush() -> None:
    def broken(_refs: list[ObjectRef]) -> None:
        raise ConnectionError("redis down")

    batcher = LingerBatcher(broken, batch_size=4, linger_s=0.01)
    with pytest.raises(ConnectionError):
        batcher.submit([ObjectRef("b", "a.jpg")]).result(timeout=5)
    batcher.close()


def test_linger_batcher_gathers_concurrent_submitters() -> None:
    flushed: list[list[ObjectRef]] = []
    batcher = LingerBatcher(flushed.append, batch_size=100, linger_s=0.3)
    threads = [
        threading.Thread(target=lambda n=n: batcher.submit([ObjectRef("b", f"{n}.jpg")]).result())
        for n in range(10)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batcher.close()
    assert len(flushed) == 1 and len(flushed[0]) == 10


def test_rate_limiter_paces_images() -> None:
    limiter = RateLimiter(1000)
    started = time.monotonic()
    for _ in range(30):
        limiter.acquire(100)  # 3,000 images at 1,000/s, with a 1 s burst allowance
    assert 1.5 < time.monotonic() - started < 3.5


def test_filters_since_match_and_image_keys() -> None:
    now = datetime.now(UTC)
    old = now - timedelta(days=30)

    def obj(key: str, when: datetime = now) -> ListedObject:
        return ListedObject(key=key, etag="e", size=1, last_modified=when)

    filters = Filters(prefix="p/", since=now - timedelta(days=1), match="2024-*/*.jpg")
    assert filters.accept(obj("p/2024-05/a.jpg"))
    assert not filters.accept(obj("p/2024-05/a.jpg", old))
    assert not filters.accept(obj("p/2023-05/a.jpg"))
    assert not filters.accept(obj("p/2024-05/a.txt"))
    assert Filters().accept(obj("any/where.png"))
