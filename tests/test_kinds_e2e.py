"""Job kinds end to end on real services: the CLI in fresh processes -> Redis -> workers with
the tiny BLIP-2 and the tiny ONNX tagger -> PostgreSQL rows and S3 sidecars, per kind.

Two workers share a private Redis: one serves caption and tags and consumes captions.bulk,
the other serves only tags and consumes captions.realtime, so a caption+tags job sent to
captions.realtime must have its caption forwarded to the first one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from captioning.embedded import PrivateRedis, free_port
from captioning.messages import BULK_QUEUE, REALTIME_QUEUE
from captioning.results import CaptionRow, ResultsStore
from captioning.settings import Settings
from tests.conftest import scrape, settings_env, wait_for_log, wait_for_rows
from tests.imagefactory import photo_bytes
from tests.test_pipeline import captioner
from tests.test_pipeline import upload as upload_to

BOTH = {"caption": "tiny-random-blip2", "tags": "tiny-random-wd14"}


@pytest.fixture(scope="module")
def broker() -> Iterator[PrivateRedis]:
    with PrivateRedis() as server:
        yield server


@pytest.fixture(scope="module")
def kinds_settings(settings: Settings, broker: PrivateRedis) -> Settings:
    return settings.model_copy(update={
        "broker_url": broker.url, "kinds": ("caption", "tags"),
        "tagger_model": "tiny-random-wd14", "tagger_batch_size": 4,
        "metrics_port": free_port(),
    })


def start_worker(
    settings: Settings, queues: str, log_path: Path
) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--queues", queues, "--loglevel", "INFO"],
            env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT,
        )
    wait_for_log(log_path, "ready", process, timeout=180)
    return process


@pytest.fixture(scope="module")
def workers(
    kinds_settings: Settings, results: ResultsStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Path]]:
    logs = tmp_path_factory.mktemp("kind-workers")
    tags_only = kinds_settings.model_copy(update={"kinds": ("tags",), "metrics_port": 0})
    processes = [
        start_worker(kinds_settings, BULK_QUEUE, logs / "both.log"),
        start_worker(tags_only, REALTIME_QUEUE, logs / "tags.log"),
    ]
    yield {"both": logs / "both.log", "tags": logs / "tags.log"}
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def upload(s3, prefix: str, files: dict[str, bytes]) -> list[str]:
    return upload_to(s3, "photos", prefix, files)


def sidecar(s3, key: str, timeout: float = 30) -> dict[str, object]:
    """The sidecar JSON at `key`; sidecars are put just after the rows are committed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return json.loads(s3.get_object(Bucket="uploads", Key=key)["Body"].read())
        except s3.exceptions.NoSuchKey:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def scrape_until(port: int, name: str, timeout: float = 30) -> dict[str, float]:
    """The worker counts an image just after its row is committed: wait for the counter."""
    deadline = time.monotonic() + timeout
    while name not in (metrics := scrape(port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return metrics


def by_kind(rows: list[CaptionRow]) -> dict[str, dict[str, CaptionRow]]:
    grouped: dict[str, dict[str, CaptionRow]] = {}
    for row in rows:
        assert row.kind is not None
        grouped.setdefault(row.kind, {})[row.uri] = row
    return grouped


def test_backfill_with_two_kinds_leaves_a_row_per_kind(
    kinds_settings: Settings, workers: dict[str, Path], results: ResultsStore, s3, prefix: str
) -> None:
    files = {**photo_bytes(), "notes.png": b"this is not an image"}
    uris = upload(s3, prefix, files)
    source = f"s3://photos/{prefix}"

    out = captioner(kinds_settings, "backfill", source, "--kind", "caption,tags")
    assert f"enqueued {len(uris)} images in 1 jobs" in out
    rows = wait_for_rows(results, source, 2 * len(uris))
    assert len(rows) == 2 * len(uris)
    kinds = by_kind(rows)
    assert set(kinds) == {"caption", "tags"}
    for kind, model in BOTH.items():
        assert sorted(kinds[kind]) == sorted(uris)
        for uri, row in kinds[kind].items():
            assert row.model == model
            if uri.endswith("notes.png"):
                assert row.status == "failed" and (row.error or "").startswith("UndecodableImage")
            else:
                assert row.status == "ok" and row.caption, row.error
    for row in kinds["tags"].values():
        if row.status != "ok":
            continue
        assert row.prompt == "" and row.tags is not None
        assert set(row.tags) == {"rating", "character", "general"}
        assert len(row.tags["rating"]) == 4
        # character tags, then general ones, each by falling probability (JSONB keeps no
        # key order, so the order is checked from the probabilities)
        words = (row.caption or "").split(", ")
        character = [w for w in words if w in row.tags["character"]]
        assert words == character + [w for w in words if w in row.tags["general"]]
        assert set(words) == set(row.tags["character"]) | set(row.tags["general"])
        for category, names in (("character", character), ("general", words[len(character):])):
            probs = [row.tags[category][name] for name in names]
            assert probs == sorted(probs, reverse=True)
        caption_row = kinds["caption"][row.uri]
        assert (row.width, row.height, row.etag) == (
            caption_row.width, caption_row.height, caption_row.etag)
        assert caption_row.tags is None

    rocket = kinds["tags"][f"{source}rocket.jpg"]
    record = sidecar(s3, f"captions/photos/{rocket.key}.tags.json")
    assert record["kind"] == "tags" and record["tags"] == rocket.tags
    caption_record = sidecar(s3, f"captions/photos/{rocket.key}.json")
    assert caption_record["caption"] == kinds["caption"][rocket.uri].caption

    ok = 'captioner_images_total{kind="%s",queue="captions.bulk",status="ok"}'
    metrics = scrape_until(kinds_settings.metrics_port, ok % "tags")
    assert metrics[ok % "tags"] >= len(uris) - 1
    assert metrics[ok % "caption"] >= len(uris) - 1
    assert metrics['captioner_stage_seconds_count{kind="tags",stage="generate"}'] >= 1
    assert metrics['captioner_stage_seconds_count{kind="shared",stage="decode"}'] >= 1
    assert metrics['captioner_image_errors_total{kind="tags",reason="UndecodableImage"}'] >= 1

    again = captioner(kinds_settings, "backfill", source, "--kind", "caption,tags")
    assert f"skipped {len(uris)} already captioned; enqueued 0 images" in again


def test_backfill_asks_each_image_only_for_the_kinds_it_misses(
    kinds_settings: Settings, workers: dict[str, Path], results: ResultsStore, s3, prefix: str
) -> None:
    photos = photo_bytes()
    uris = upload(s3, prefix, {name: photos[name] for name in ("rocket.jpg", "coffee.png")})
    source = f"s3://photos/{prefix}"
    captioner(kinds_settings, "enqueue", *uris, "--kind", "caption", "--queue", BULK_QUEUE)
    wait_for_rows(results, source, 2)

    out = captioner(kinds_settings, "backfill", source, "--kind", "caption,tags")
    assert "skipped 0 already captioned; enqueued 2 images in 1 jobs" in out
    rows = wait_for_rows(results, source, 4)
    kinds = by_kind(rows)
    assert {row.status for row in rows} == {"ok"}
    assert all(row.attempts == 1 for row in kinds["caption"].values())  # not captioned again
    assert sorted(kinds["tags"]) == sorted(uris)


def test_a_kind_the_worker_lacks_is_forwarded_to_one_that_serves_it(
    kinds_settings: Settings, workers: dict[str, Path], results: ResultsStore, s3, prefix: str
) -> None:
    uris = upload(s3, prefix, {"rocket.jpg": photo_bytes()["rocket.jpg"]})
    out = captioner(kinds_settings, "enqueue", *uris, "--kind", "caption,tags",
                    "--queue", REALTIME_QUEUE)
    assert "enqueued 1 images in 1 jobs to captions.realtime" in out
    rows = wait_for_rows(results, f"s3://photos/{prefix}", 2)
    kinds = by_kind(rows)
    assert {row.status for row in rows} == {"ok"}
    # tags by the tags-only worker, which forwarded the caption to the other one
    assert kinds["tags"][uris[0]].worker != kinds["caption"][uris[0]].worker
    assert "forwarded to captions.kind.caption" in workers["tags"].read_text()
    assert "captions.kind.caption" in workers["both"].read_text()  # it consumes its kinds


def test_a_job_for_another_tagger_fails_with_a_reason(
    kinds_settings: Settings, workers: dict[str, Path], results: ResultsStore, s3, prefix: str
) -> None:
    uris = upload(s3, prefix, {"rocket.jpg": photo_bytes()["rocket.jpg"]})
    other = kinds_settings.model_copy(update={"tagger_model": "SmilingWolf/wd-vit-tagger-v3"})
    captioner(other, "enqueue", *uris, "--kind", "tags", "--queue", BULK_QUEUE)
    [row] = wait_for_rows(results, f"s3://photos/{prefix}", 1)
    assert row.status == "failed" and row.model == "SmilingWolf/wd-vit-tagger-v3"
    assert (row.error or "").startswith("ModelMismatch") and "CAPTIONER_TAGGER_MODEL" in (
        row.error or "")
