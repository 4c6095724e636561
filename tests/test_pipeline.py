"""End to end on real services: CLI -> Redis -> worker (tiny BLIP-2) -> PostgreSQL + S3 sidecars."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from captioning.broker import create_app
from captioning.messages import REALTIME_QUEUE, CaptionJob, JobItem
from captioning.results import CaptionRow, ResultsStore
from captioning.settings import Settings
from producer.enqueue import JobSender
from tests.conftest import settings_env
from tests.imagefactory import awkward_images, hostile_files, photo_bytes

pytestmark = pytest.mark.usefixtures("worker")

RowsUnder = Callable[..., list[CaptionRow]]


def captioner(settings: Settings, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=settings_env(settings),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def upload(s3, bucket: str, prefix: str, files: dict[str, bytes]) -> list[str]:
    for name, data in files.items():
        s3.put_object(Bucket=bucket, Key=prefix + name, Body=data)
    return [f"s3://{bucket}/{prefix}{name}" for name in files]


def test_enqueue_captions_photos_into_postgres_and_sidecars(
    settings: Settings, s3, prefix: str, rows_under: RowsUnder
) -> None:
    files = photo_bytes()
    files["with space + plus/ünïcode café.jpg"] = files["rocket.jpg"]
    uris = upload(s3, "photos", prefix, files)

    out = captioner(settings, "enqueue", *uris[:3], "--batch-size", "2")
    assert "enqueued 3 images in 2 jobs" in out
    captioner(settings, "enqueue", "--from-file", "-", stdin="\n".join(uris[3:]) + "\n")

    rows = rows_under(f"s3://photos/{prefix}", len(uris))
    assert sorted(r.uri for r in rows) == sorted(uris)
    assert all(r.status == "ok" and r.caption for r in rows), [r.error for r in rows]
    by_name = {r.key.removeprefix(prefix): r for r in rows}
    assert (by_name["chelsea.png"].width, by_name["chelsea.png"].height) == (451, 300)
    assert by_name["rocket.jpg"].etag and by_name["rocket.jpg"].bytes == len(files["rocket.jpg"])

    odd = by_name["with space + plus/ünïcode café.jpg"]
    sidecar = s3.get_object(Bucket="uploads", Key=f"captions/photos/{odd.key}.json")
    record = json.loads(sidecar["Body"].read())
    assert record["caption"] == odd.caption
    assert record["status"] == "ok" and record["uri"] == odd.uri


def test_every_bad_input_gets_one_failed_row_and_the_worker_survives(
    settings: Settings, s3, prefix: str, rows_under: RowsUnder, local_root: Path
) -> None:
    hostile = hostile_files(settings.max_image_bytes)
    uris = upload(s3, "photos", prefix, {name: data for name, (data, _) in hostile.items()})
    expected = {uri: error for uri, (_, error) in zip(uris, hostile.values(), strict=True)}
    s3.put_object(Bucket="forbidden", Key=prefix + "secret.jpg", Body=photo_bytes()["rocket.jpg"])
    outside = local_root.parent / f"outside-{prefix.strip('/')}.png"
    outside.write_bytes(photo_bytes()["coffee.png"])
    link = local_root / f"link-{prefix.strip('/')}.png"
    link.symlink_to(outside)
    refused = {
        f"s3://photos/{prefix}missing.jpg": "ObjectMissing",
        f"s3://forbidden/{prefix}secret.jpg": "UriRefused",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/": "UriRefused",
        "file:///etc/passwd": "UriRefused",
        f"file://{local_root}/../{outside.name}": "UriRefused",
        link.as_uri(): "UriRefused",
        "ftp://example.com/x.jpg": "UriRefused",
    }
    expected.update(refused)
    good = upload(s3, "photos", prefix, {"after.jpg": photo_bytes()["rocket.jpg"]})

    captioner(settings, "enqueue", *expected, *good, "--batch-size", "5")

    rows = {r.uri: r for r in rows_under(f"s3://photos/{prefix}", len(hostile) + 2)}
    for uri in refused:
        if not uri.startswith(f"s3://photos/{prefix}"):
            rows.update({r.uri: r for r in ResultsStore(settings.database_url).rows(prefix=uri)})
    for uri, error in expected.items():
        assert uri in rows, f"no row for {uri}"
        assert rows[uri].status == "failed", uri
        assert rows[uri].error.startswith(error), (uri, rows[uri].error)
        assert rows[uri].caption is None
    assert rows[good[0]].status == "ok"


def test_refused_uris_never_touch_the_network(
    settings: Settings, prefix: str, rows_under: RowsUnder, results: ResultsStore
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    connections: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connections.append(listener.accept())
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    uris = [
        f"http://127.0.0.1:{port}/{prefix}a.jpg",
        f"https://127.0.0.1:{port}/{prefix}b.jpg",
        f"file://127.0.0.1:{port}/{prefix}c.jpg",
    ]
    captioner(settings, "enqueue", *uris)
    got = [rows_under(uri, 1)[0] for uri in uris]
    stop.set()
    thread.join()
    listener.close()
    assert [r.status for r in got] == ["failed"] * 3
    assert all(r.error.startswith("UriRefused") for r in got)
    assert connections == []


def test_awkward_but_valid_images_caption(
    settings: Settings, local_root: Path, prefix: str, rows_under: RowsUnder
) -> None:
    folder = local_root / prefix.strip("/")
    folder.mkdir()
    for name, data in awkward_images().items():
        (folder / name).write_bytes(data)
    uris = [p.as_uri() for p in sorted(folder.iterdir())]

    captioner(settings, "enqueue", *uris)

    rows = rows_under(folder.as_uri(), len(uris))
    assert {r.uri: r.status for r in rows} == dict.fromkeys(uris, "ok"), [r.error for r in rows]
    rotated = next(r for r in rows if r.uri.endswith("rotated-exif.jpg"))
    assert (rotated.width, rotated.height) == (64, 96)


def test_a_job_delivered_twice_leaves_one_row_per_image(
    settings: Settings, s3, prefix: str, rows_under: RowsUnder, results: ResultsStore
) -> None:
    uris = upload(s3, "photos", prefix, {"a.png": photo_bytes()["coffee.png"]})
    uris += [f"s3://photos/{prefix}missing.png"]
    job = CaptionJob(
        items=tuple(JobItem(uri=u) for u in uris), model=settings.model, source="cli"
    )
    with JobSender(create_app(settings), REALTIME_QUEUE) as sender:
        sender.send(job)
        sender.send(job)

    rows_under(f"s3://photos/{prefix}", 2)
    rows = wait_for_attempts(results, f"s3://photos/{prefix}", expected=2)
    assert len(rows) == 2
    assert sorted(r.status for r in rows) == ["failed", "ok"]


def wait_for_attempts(results: ResultsStore, uri_prefix: str, expected: int) -> list[CaptionRow]:
    import time

    deadline = time.monotonic() + 60
    while True:
        rows = results.rows(prefix=uri_prefix)
        if all(r.attempts >= expected for r in rows) or time.monotonic() > deadline:
            assert all(r.attempts == expected for r in rows), [r.attempts for r in rows]
            return rows
        time.sleep(0.25)


def test_backfill_enqueues_images_and_skips_what_is_done(
    settings: Settings, s3, prefix: str, rows_under: RowsUnder
) -> None:
    photos = photo_bytes()
    upload(s3, "photos", prefix, {"a.jpg": photos["rocket.jpg"], "b.png": photos["coffee.png"]})
    upload(s3, "photos", prefix, {"notes.txt": b"not an image", "c.PNG": photos["chelsea.png"]})
    source = f"s3://photos/{prefix}"

    dry = captioner(settings, "backfill", source, "--dry-run")
    assert "would enqueue 3 images" in dry
    assert captioner(settings, "status", "--json")

    out = captioner(settings, "backfill", source, "--batch-size", "2")
    assert "listed 4 objects, 3 images; skipped 0" in out
    assert len(rows_under(source, 3)) == 3

    upload(s3, "photos", prefix, {"d.webp": photos["astronaut.png"]})
    again = captioner(settings, "backfill", source)
    assert "skipped 3 already captioned; enqueued 1 images" in again
    rows = rows_under(source, 4)
    assert sorted(r.key.removeprefix(prefix) for r in rows) == ["a.jpg", "b.png", "c.PNG", "d.webp"]

    limited = captioner(settings, "backfill", source, "--no-skip-existing", "--limit", "2")
    assert "enqueued 2 images" in limited


def test_results_command_prints_table_jsonl_and_csv(
    settings: Settings, s3, prefix: str, rows_under: RowsUnder
) -> None:
    uris = upload(s3, "photos", prefix, {"x.png": photo_bytes()["coffee.png"]})
    uris.append(f"s3://photos/{prefix}gone.png")
    captioner(settings, "enqueue", *uris)
    rows_under(f"s3://photos/{prefix}", 2)
    source = f"s3://photos/{prefix}"

    table = captioner(settings, "results", "--prefix", source)
    assert "(2 rows)" in table and "ObjectMissing" in table
    lines = captioner(settings, "results", "--prefix", source, "--format", "jsonl").splitlines()
    assert sorted(json.loads(line)["status"] for line in lines) == ["failed", "ok"]
    csv_out = captioner(
        settings, "results", "--prefix", source, "--status", "ok", "--format", "csv"
    )
    assert csv_out.splitlines()[0].startswith("uri,bucket,key,etag")
    assert len(csv_out.splitlines()) == 2


def test_backfill_of_photos_and_hostile_files_leaves_one_row_per_object(
    settings: Settings, s3, prefix: str, rows_under: RowsUnder
) -> None:
    photos = photo_bytes()
    hostile = hostile_files(settings.max_image_bytes)
    upload(s3, "photos", prefix, photos)
    upload(s3, "photos", prefix, {name: data for name, (data, _) in hostile.items()})
    source = f"s3://photos/{prefix}"

    out = captioner(settings, "backfill", source, "--batch-size", "4")
    assert f"enqueued {len(photos) + len(hostile)} images" in out

    rows = {r.key.removeprefix(prefix): r for r in rows_under(source, len(photos) + len(hostile))}
    assert len(rows) == len(photos) + len(hostile)
    assert all(rows[name].status == "ok" for name in photos)
    for name, (_, error) in hostile.items():
        assert rows[name].status == "failed" and rows[name].error.startswith(error)
    again = captioner(settings, "backfill", source)
    assert f"skipped {len(photos) + len(hostile)} already captioned; enqueued 0" in again


def test_a_job_for_another_model_fails_its_images_with_the_reason(
    settings: Settings, s3, prefix: str, rows_under: RowsUnder
) -> None:
    uris = upload(s3, "photos", prefix, {"a.png": photo_bytes()["coffee.png"]})
    job = CaptionJob(items=(JobItem(uri=uris[0]),), model="some/other-blip2", source="cli")
    with JobSender(create_app(settings), REALTIME_QUEUE) as sender:
        sender.send(job)

    rows = rows_under(f"s3://photos/{prefix}", 1)
    assert [r.status for r in rows] == ["failed"]
    assert rows[0].error.startswith("ModelMismatch: job asks for model 'some/other-blip2'")
    assert rows[0].model == "some/other-blip2"


def test_an_oversized_object_enqueued_by_uri_is_not_captioned_again_by_a_backfill(
    settings: Settings, s3, prefix: str, rows_under: RowsUnder
) -> None:
    huge, _ = hostile_files(settings.max_image_bytes)["huge.jpg"]
    uris = upload(s3, "photos", prefix, {"huge.jpg": huge})
    captioner(settings, "enqueue", *uris)
    [row] = rows_under(f"s3://photos/{prefix}", 1)
    listed = s3.head_object(Bucket="photos", Key=f"{prefix}huge.jpg")["ETag"].strip('"')
    assert row.error.startswith("ImageTooLarge") and row.etag == listed

    again = captioner(settings, "backfill", f"s3://photos/{prefix}")
    assert "skipped 1 already captioned; enqueued 0 images" in again
