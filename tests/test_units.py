"""Pure functions and the SQLite results store: no services needed."""

from __future__ import annotations

import base64
import json
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from captioning.errors import ConfigError, InvalidJob, UriRefused
from captioning.messages import CaptionJob, JobItem
from captioning.queues import images_in, job_of
from captioning.results import CaptionRow, ResultsStore, row_id, sidecar_key
from captioning.settings import Settings
from captioning.storage import ListedObject
from captioning.uris import allowed_location, parse_prefix, parse_uri
from cli.results import format_table
from producer.backfill import Filters, pending_items
from producer.enqueue import make_jobs
from producer.keys import is_image_key
from workers.retry import backoff_seconds


@pytest.mark.parametrize(
    ("uri", "bucket", "key"),
    [
        ("s3://photos/a.jpg", "photos", "a.jpg"),
        ("s3://photos/dir/with space+plus/ünï.jpg", "photos", "dir/with space+plus/ünï.jpg"),
        ("s3://photos/what?#.jpg", "photos", "what?#.jpg"),
        ("file:///srv/images/a%20b.png", "", "/srv/images/a b.png"),
    ],
)
def test_parse_uri_keeps_keys_exactly(uri: str, bucket: str, key: str) -> None:
    location = parse_uri(uri)
    assert (location.bucket, location.key) == (bucket, key)


@pytest.mark.parametrize(
    "uri",
    [
        "http://169.254.169.254/latest/meta-data/",
        "https://example.com/a.jpg",
        "ftp://example.com/a.jpg",
        "gs://bucket/a.jpg",
        "/etc/passwd",
        "file://otherhost/etc/passwd",
        "s3://bucket-only",
        "s3:///no-bucket.jpg",
        "s3://photos/dir/",
        "s3://photos/a\n.jpg",
        "s3://photos/" + "k" * 3000,
    ],
)
def test_unsupported_or_malformed_uris_are_refused(uri: str) -> None:
    with pytest.raises(UriRefused):
        parse_uri(uri)


def test_allow_lists(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.jpg").write_bytes(b"x")
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (root / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    settings = Settings(allowed_buckets=("photos",), allowed_roots=(root,))

    assert allowed_location("s3://photos/a.jpg", settings).bucket == "photos"
    assert allowed_location((root / "ok.jpg").as_uri(), settings).key == str(root / "ok.jpg")
    for refused in (
        "s3://other/a.jpg",
        f"file://{root}/../secret.jpg",
        (root / "escape.jpg").as_uri(),
        "file:///etc/passwd",
    ):
        with pytest.raises(UriRefused):
            allowed_location(refused, settings)
    with pytest.raises(UriRefused, match="ALLOWED_ROOTS is empty"):
        allowed_location((root / "ok.jpg").as_uri(), Settings())


def test_settings_parse_comma_lists_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONER_ALLOWED_BUCKETS", "photos, uploads")
    monkeypatch.setenv("CAPTIONER_ALLOWED_ROOTS", "/srv/a,/srv/b")
    monkeypatch.setenv("CAPTIONER_BATCH_SIZE", "24")
    settings = Settings()
    assert settings.allowed_buckets == ("photos", "uploads")
    assert settings.allowed_roots == (Path("/srv/a"), Path("/srv/b"))
    assert settings.batch_size == 24
    assert settings.visibility_timeout_s > settings.job_deadline_s


@pytest.mark.parametrize(
    "payload",
    [
        "not a dict",
        {},
        {"items": [], "model": "m", "source": "cli"},
        {"items": [{"uri": "s3://b/k"}], "model": "m", "source": "elsewhere"},
        {"items": [{"uri": 5}], "model": "m", "source": "cli"},
        {"items": [{"uri": "s3://b/k", "extra": 1}], "model": "m", "source": "cli"},
        {"items": [{"uri": "s3://b/k"}] * 5000, "model": "m", "source": "cli"},
        {"items": [{"uri": "s3://b/k"}], "model": "m", "source": "cli", "prompt": "x" * 10_000},
    ],
)
def test_malformed_jobs_are_rejected_with_a_reason(payload: object) -> None:
    with pytest.raises(InvalidJob, match=r"CaptionJob|JSON object"):
        CaptionJob.from_message(payload)


def test_jobs_round_trip_and_batch() -> None:
    items = [JobItem(uri=f"s3://b/{i}.jpg") for i in range(70)]
    jobs = list(make_jobs(items, batch_size=32, annotators={"caption": "m"}, prompts=("",),
                          source="backfill"))
    assert [len(job.items) for job in jobs] == [32, 32, 6]
    message = json.loads(json.dumps(jobs[0].to_message()))
    assert CaptionJob.from_message(message) == jobs[0]
    assert set(message) == {"base", "keys", "model", "prompt", "source", "enqueued_at"}
    assert (message["base"], message["keys"][:2]) == ("s3://b/", ["0.jpg", "1.jpg"])
    original = {**jobs[0].model_dump(mode="json")}
    assert CaptionJob.from_message(original) == jobs[0]  # messages from older producers


def test_compact_form_keeps_etags_versions_and_mixed_prefixes() -> None:
    items = (
        JobItem(uri="s3://b/dir/a.jpg", etag="e1"),
        JobItem(uri="s3://b/dir/sub/b.jpg", version_id="v2"),
        JobItem(uri="s3://other/c.jpg"),
        JobItem(uri="file:///srv/d.jpg", etag="e4"),
    )
    job = CaptionJob(items=items, model="m", prompt="p", source="cli", enqueued_at=5.0)
    message = json.loads(json.dumps(job.to_message()))
    assert message["base"] == ""
    assert message["etags"] == ["e1", None, None, "e4"]
    assert message["versions"] == [None, "v2", None, None]
    assert CaptionJob.from_message(message) == job
    same_dir = CaptionJob(items=items[:2], model="m", source="cli").to_message()
    assert (same_dir["base"], same_dir["keys"]) == ("s3://b/dir/", ["a.jpg", "sub/b.jpg"])


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"keys": "a.jpg", "model": "m", "source": "cli"}, "keys a list"),
        ({"base": 3, "keys": ["a"], "model": "m", "source": "cli"}, "base must be a string"),
        ({"keys": [1], "model": "m", "source": "cli"}, "keys must be strings"),
        ({"keys": ["a"], "etags": [], "model": "m", "source": "cli"}, "etags must be a list"),
        ({"keys": ["a"], "items": [], "model": "m", "source": "cli"}, "not both"),
        ({"base": "s3://b/", "keys": [], "model": "m", "source": "cli"}, "items"),
        ({"base": "s3://b/", "keys": ["a"] * 5000, "model": "m", "source": "cli"}, "items"),
        ({"base": "s3://b/", "keys": ["a"], "model": "m", "source": "cli", "x": 1}, "x"),
    ],
)
def test_malformed_compact_jobs_are_rejected_with_a_reason(payload: object, reason: str) -> None:
    with pytest.raises(InvalidJob, match=reason):
        CaptionJob.from_message(payload)


def test_job_of_reads_a_raw_kombu_message() -> None:
    job = {"items": [{"uri": "s3://b/k"}] * 3, "enqueued_at": 1.0}
    body = base64.b64encode(json.dumps([[job], {}, {}]).encode()).decode()
    raw = json.dumps({"body": body, "properties": {"body_encoding": "base64"}})
    assert images_in(job_of(raw)) == 3
    compact = {"base": "s3://b/", "keys": ["k1", "k2"], "enqueued_at": 1.0}
    unencoded = json.dumps({"body": json.dumps([[compact], {}, {}]), "properties": {}})
    assert images_in(job_of(unencoded)) == 2
    assert job_of(b"garbage") is None
    assert images_in(None) == 0


def test_image_keys_and_pending_items_skip_done_rows() -> None:
    assert is_image_key("a/b.JPG") and is_image_key("x.webp")
    assert not is_image_key("notes.txt") and not is_image_key("dir/")
    now = datetime.now(UTC)
    page = [
        ListedObject(key=k, etag="e", size=1, last_modified=now)
        for k in ("a.jpg", "b.txt", "c.png")
    ]
    settings = Settings(model="m")
    done = {row_id("s3://bkt/a.jpg", "e", "m", "")}
    asked: list[list[str]] = []

    def done_ids(ids: list[str]) -> set[str]:
        asked.append(ids)
        return done & set(ids)

    pending, candidates = pending_items(
        "bkt", page, settings=settings, filters=Filters(), done_ids=done_ids
    )
    assert [p.item.uri for p in pending] == ["s3://bkt/c.png"] and candidates == 2
    assert pending[0].kinds == ("caption",)
    assert len(asked) == 1 and len(asked[0]) == 2


def test_backoff_is_bounded_full_jitter() -> None:
    rng = random.Random(1)
    for attempt in range(12):
        delay = backoff_seconds(attempt, base=1.0, cap=60.0, rng=rng)
        assert 0 <= delay <= min(60.0, 2**attempt)


def test_sidecar_keys() -> None:
    row = make_row("s3://photos/a b/c.jpg", bucket="photos", key="a b/c.jpg")
    assert sidecar_key("captions/", row) == "captions/photos/a b/c.jpg.json"
    local = make_row("file:///srv/x.png", bucket="", key="/srv/x.png")
    assert sidecar_key("/out", local) == "out/_local/srv/x.png.json"
    assert parse_prefix("s3://uploads").key == ""


def make_row(uri: str, *, bucket: str = "b", key: str = "k", status: str = "ok") -> CaptionRow:
    return CaptionRow(
        uri=uri, bucket=bucket, key=key, etag="e", version_id=None, model="m", prompt="",
        status=status, caption="a cat" if status == "ok" else None,
        error=None if status == "ok" else "ObjectMissing: no such object",
        width=1, height=1, bytes=1, enqueued_at=None, finished_at=datetime.now(UTC), worker="w",
    )


def test_sqlite_results_store_upserts_one_row_per_image(tmp_path: Path) -> None:
    store = ResultsStore(f"sqlite:///{tmp_path / 'captions.db'}")
    store.create_schema()
    store.create_schema()
    first = [make_row("s3://b/1.jpg"), make_row("s3://b/2.jpg", status="failed")]
    store.upsert(first)
    store.upsert([make_row("s3://b/1.jpg")])
    rows = store.rows(prefix="s3://b/")
    assert [(r.uri, r.attempts) for r in rows] == [("s3://b/1.jpg", 2), ("s3://b/2.jpg", 1)]
    assert store.status_counts() == {"ok": 1, "failed": 1}
    assert [r.uri for r in store.rows(status="failed")] == ["s3://b/2.jpg"]
    assert store.rows(prefix="s3://b/1_") == []
    assert store.existing_ids([first[0].row_id, "nope"]) == {first[0].row_id}


def test_table_output_names_every_row() -> None:
    rows = [make_row("s3://b/1.jpg"), make_row("s3://b/2.jpg", status="failed")]
    table = format_table([row.to_json() for row in rows])
    assert "a cat" in table and "ObjectMissing" in table and "(2 rows)" in table


def test_a_missing_captions_table_says_to_run_db_upgrade(tmp_path: Path) -> None:
    store = ResultsStore(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(ConfigError, match="run `captioner db upgrade`"):
        store.rows()
    with pytest.raises(ConfigError, match="run `captioner db upgrade`"):
        store.require_schema()
    store.create_schema()
    store.require_schema()
    assert store.rows() == []


def test_settings_survive_the_trip_to_a_child_process_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    original = Settings(
        allowed_buckets=("a", "b"), allowed_roots=(tmp_path,), pool="threads",
        static_cache=True, webhook_secret="s3cret", job_time_limit_s=60,
    )
    for name, value in original.as_env().items():
        monkeypatch.setenv(name, value)
    assert Settings() == original
