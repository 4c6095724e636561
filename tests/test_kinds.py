"""Job kinds without a worker: the message forms, routing, queues, per-kind keys and the
schema upgrade (on SQLite and the real PostgreSQL)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from captioning.errors import ConfigError, InvalidJob, KindNotServed, ModelMismatch
from captioning.kinds import annotators, parse_kinds
from captioning.messages import BULK_QUEUE, REALTIME_QUEUE, CaptionJob, JobItem, kind_queue
from captioning.results import CaptionRow, ResultsStore, row_id, sidecar_key
from captioning.settings import Settings
from captioning.storage import ListedObject
from producer.backfill import Filters, pending_items
from workers.routing import consume_order, plan

ITEMS = (JobItem(uri="s3://b/a.jpg"),)


def test_a_message_without_kinds_is_a_caption_job() -> None:
    old = {"items": [{"uri": "s3://b/a.jpg"}], "model": "m", "source": "cli"}
    job = CaptionJob.from_message(old)
    assert job.annotators == {"caption": "m"}


def test_kinds_round_trip_and_caption_only_jobs_keep_the_old_form() -> None:
    both = CaptionJob.create(items=ITEMS, annotators={"caption": "m", "tags": "t"},
                             prompts=("p",), source="cli")
    message = json.loads(json.dumps(both.to_message()))
    assert "model" not in message and message["kinds"] == {"caption": "m", "tags": "t"}
    assert CaptionJob.from_message(message) == both
    caption_only = CaptionJob.create(items=ITEMS, annotators={"caption": "m"}, prompts=("",),
                                     source="cli").to_message()
    assert "kinds" not in caption_only and caption_only["model"] == "m"  # old workers read it


@pytest.mark.parametrize(
    "extra",
    [
        {},  # neither form
        {"model": "m", "kinds": {"tags": "t"}},  # both
        {"kinds": {}},
        {"kinds": {"Tags!": "t"}},
        {"kinds": {"tags": ""}},
        {"kinds": {f"k{i}": "m" for i in range(9)}},
    ],
)
def test_malformed_kinds_are_invalid_jobs(extra: dict[str, object]) -> None:
    with pytest.raises(InvalidJob, match="CaptionJob"):
        CaptionJob.from_message({"items": [{"uri": "s3://b/a.jpg"}], "source": "cli", **extra})


def test_kinds_setting_and_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONER_KINDS", "tags, caption,tags")
    settings = Settings()
    assert settings.kinds == ("tags", "caption")
    assert annotators(settings, settings.kinds) == {
        "tags": "SmilingWolf/wd-vit-tagger-v3", "caption": "Salesforce/blip2-opt-2.7b",
    }
    assert Settings(kinds=("caption",)).as_env()["CAPTIONER_KINDS"] == "caption"
    with pytest.raises(ConfigError, match="unknown kind 'tag'"):
        parse_kinds(["tag"])
    monkeypatch.setenv("CAPTIONER_KINDS", "caption,nope")
    with pytest.raises(ValueError, match="CAPTIONER_KINDS"):
        Settings()


def test_routing_runs_forwards_and_refuses() -> None:
    served = {"caption": "blip"}
    routes = plan({"caption": "blip", "tags": "wd"}, served, queue=BULK_QUEUE)
    assert routes.run == {"caption": "blip"} and routes.forward == {"tags": "wd"}
    assert not routes.refuse

    mismatch = plan({"caption": "other"}, served, queue=BULK_QUEUE).refuse["caption"]
    assert mismatch[0] == "other" and isinstance(mismatch[1], ModelMismatch)
    assert "CAPTIONER_MODEL" in str(mismatch[1])

    unknown = plan({"colour": "x"}, served, queue=BULK_QUEUE).refuse["colour"][1]
    assert isinstance(unknown, KindNotServed) and "unknown kind" in str(unknown)

    # never forwarded twice: a kind queue only its workers consume
    looped = plan({"tags": "wd"}, served, queue=kind_queue("tags")).refuse["tags"][1]
    assert isinstance(looped, KindNotServed) and "CAPTIONER_KINDS" in str(looped)


def test_kind_queues_come_after_realtime_and_before_bulk() -> None:
    assert consume_order([REALTIME_QUEUE, BULK_QUEUE], ["caption", "tags"]) == [
        REALTIME_QUEUE, "captions.kind.caption", "captions.kind.tags", BULK_QUEUE,
    ]
    assert consume_order([BULK_QUEUE], ["tags"]) == ["captions.kind.tags", BULK_QUEUE]
    listed = [BULK_QUEUE, "captions.kind.tags"]  # queues listed in --queues keep their place
    assert consume_order(listed, ["tags"]) == listed


def test_backfill_skips_per_kind() -> None:
    now = datetime.now(UTC)
    page = [ListedObject(key=k, etag="e", size=1, last_modified=now) for k in ("a.jpg", "b.jpg")]
    settings = Settings(model="blip", tagger_model="wd", prompt="Question: what? Answer:",
                        kinds=("caption", "tags"))
    done = {
        row_id("s3://bkt/a.jpg", "e", "blip", "Question: what? Answer:"),
        row_id("s3://bkt/a.jpg", "e", "wd", ""),  # a tagger's rows have no prompt
        row_id("s3://bkt/b.jpg", "e", "blip", "Question: what? Answer:"),
    }
    pending, candidates = pending_items(
        "bkt", page, settings=settings, filters=Filters(), done_ids=lambda ids: done & set(ids)
    )
    assert candidates == 2
    assert [(p.item.uri, p.kinds) for p in pending] == [("s3://bkt/b.jpg", ("tags",))]


def row(kind: str | None) -> CaptionRow:
    return CaptionRow(
        uri="s3://photos/a.jpg", bucket="photos", key="a.jpg", etag="e", version_id=None,
        model="m", prompt="", status="ok", caption="c", error=None, width=1, height=1, bytes=1,
        enqueued_at=None, finished_at=datetime.now(UTC), worker="w", kind=kind,
        tags={"rating": {"general": 0.5}, "character": {}, "general": {"sky": 0.9}}
        if kind == "tags" else None,
    )


def test_sidecars_per_kind() -> None:
    assert sidecar_key("out", row(None)) == "out/photos/a.jpg.json"
    assert sidecar_key("out", row("caption")) == "out/photos/a.jpg.json"
    assert sidecar_key("out", row("tags")) == "out/photos/a.jpg.tags.json"
    # A job with several prompts: caption rows of a later prompt get their own key, while
    # the tags row (prompt '') keeps its kind's key.
    later = replace(row("caption"), prompt="Question: what? Answer:")
    digest = hashlib.sha256(later.prompt.encode()).hexdigest()[:12]
    assert sidecar_key("out", later, main_prompt="") == f"out/photos/a.jpg.{digest}.json"
    assert sidecar_key("out", row("caption"), main_prompt="") == "out/photos/a.jpg.json"
    tags = sidecar_key("out", row("tags"), main_prompt="Question: what? Answer:")
    assert tags == "out/photos/a.jpg.tags.json"


OLD_TABLE = """CREATE TABLE captions (
    id VARCHAR(64) PRIMARY KEY, uri TEXT NOT NULL, bucket TEXT NOT NULL, key TEXT NOT NULL,
    etag TEXT NOT NULL, version_id TEXT, model TEXT NOT NULL, prompt TEXT NOT NULL,
    status VARCHAR(8) NOT NULL, caption TEXT, error TEXT, width INTEGER, height INTEGER,
    bytes INTEGER, attempts INTEGER NOT NULL, enqueued_at TIMESTAMP WITH TIME ZONE,
    finished_at TIMESTAMP WITH TIME ZONE NOT NULL, worker TEXT)"""


def upgrade_keeps_old_rows(store: ResultsStore) -> None:
    with store.engine.begin() as conn:
        conn.execute(text(OLD_TABLE))
        conn.execute(text(
            "INSERT INTO captions VALUES ('x', 's3://b/old.jpg', 'b', 'old.jpg', 'e', NULL, "
            "'m', '', 'ok', 'an old caption', NULL, 1, 1, 1, 1, NULL, '2024-01-01 00:00:00+00', "
            "'w')"
        ))
    assert store.create_schema() == [
        "content_digest", "kind", "tags", "match_probability", "itc_cosine", "scorer",
        "candidates",
    ]
    assert store.create_schema() == []
    [old] = store.rows()
    assert old.caption == "an old caption" and old.kind is None and old.tags is None
    store.upsert([row("tags")])
    tagged = next(r for r in store.rows() if r.kind == "tags")
    assert tagged.tags == row("tags").tags


def test_db_upgrade_adds_the_new_columns_on_sqlite(tmp_path: Path) -> None:
    store = ResultsStore(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade_keeps_old_rows(store)
    store.dispose()


def test_db_upgrade_adds_the_new_columns_on_postgres(postgres_url: str) -> None:
    admin_url = postgres_url.rsplit("/", 1)[0] + "/postgres"
    database = f"{postgres_url.rsplit('/', 1)[1]}_upgrade"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    store = ResultsStore(postgres_url.rsplit("/", 1)[0] + f"/{database}")
    try:
        upgrade_keeps_old_rows(store)
        with store.engine.connect() as conn:
            kind = conn.execute(text(
                "SELECT data_type FROM information_schema.columns "
                "WHERE table_name = 'captions' AND column_name = 'tags'"
            )).scalar()
        assert kind == "jsonb"
    finally:
        store.dispose()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
