"""Several prompts per job: the message form, what old messages mean, skip-existing per prompt."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from captioning.errors import InvalidJob
from captioning.messages import CaptionJob, JobItem
from captioning.results import row_id
from captioning.settings import Settings
from captioning.storage import ListedObject
from producer.backfill import Filters, pending_items
from producer.enqueue import make_jobs

QUESTION = "Question: what is the style of this image? Answer:"
ITEM = {"uri": "s3://b/a.jpg", "etag": None, "version_id": None}


def test_an_old_message_means_its_one_prompt() -> None:
    job = CaptionJob.from_message(
        {"items": [ITEM], "model": "m", "prompt": "a photo of", "source": "cli", "enqueued_at": 1}
    )
    assert job.all_prompts == ("a photo of",)


def test_one_prompt_is_sent_in_the_old_form_several_in_the_new() -> None:
    items = [JobItem(uri=f"s3://b/{i}.jpg") for i in range(3)]
    caption = {"caption": "m"}
    (single,) = make_jobs(items, batch_size=8, annotators=caption, prompts=("",), source="cli")
    assert "prompts" not in single.to_message()
    (double,) = make_jobs(
        items, batch_size=8, annotators=caption, prompts=("", QUESTION), source="cli"
    )
    message = json.loads(json.dumps(double.to_message()))
    assert message["prompts"] == ["", QUESTION] and message["model"] == "m"
    assert CaptionJob.from_message(message).all_prompts == ("", QUESTION)


def test_prompts_ride_with_kinds() -> None:
    (job,) = make_jobs(
        [JobItem(uri="s3://b/a.jpg")], batch_size=8, annotators={"caption": "m", "tags": "t"},
        prompts=("", QUESTION), source="cli",
    )
    message = json.loads(json.dumps(job.to_message()))
    assert message["kinds"] == {"caption": "m", "tags": "t"} and "model" not in message
    assert message["prompts"] == ["", QUESTION]
    assert CaptionJob.from_message(message) == job


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"prompts": ["a", "a"]}, "must not repeat"),
        ({"prompts": []}, "at least 1"),
        ({"prompts": ["a"] * 9}, "at most 8"),
        ({"prompt": "b", "prompts": ["a", "c"]}, "either prompt or prompts"),
        ({"prompts": ["x" * 1001]}, "at most 1000"),
    ],
)
def test_bad_prompt_lists_are_invalid_jobs(fields: dict[str, object], problem: str) -> None:
    message = {"items": [ITEM], "model": "m", "source": "cli", **fields}
    with pytest.raises(InvalidJob, match=problem):
        CaptionJob.from_message(message)


def test_backfill_skips_an_image_only_when_every_prompt_has_its_row() -> None:
    listed = datetime(2026, 1, 1, tzinfo=UTC)
    page = [
        ListedObject(key=k, etag="e", size=10, last_modified=listed) for k in ("a.jpg", "c.jpg")
    ]
    done = {
        row_id("s3://bkt/a.jpg", "e", "m", ""),
        row_id("s3://bkt/a.jpg", "e", "m", QUESTION),
        row_id("s3://bkt/c.jpg", "e", "m", ""),
    }
    pending, candidates = pending_items(
        "bkt", page, settings=Settings(model="m"), filters=Filters(),
        done_ids=lambda ids: done & set(ids), prompts=("", QUESTION),
    )
    assert [p.item.uri for p in pending] == ["s3://bkt/c.jpg"] and candidates == 2
    assert pending[0].kinds == ("caption",)


def test_backfill_skips_per_kind_and_prompt() -> None:
    """The caption kind misses when any prompt misses; tags (no prompt) has one row."""
    listed = datetime(2026, 1, 1, tzinfo=UTC)
    page = [
        ListedObject(key=k, etag="e", size=10, last_modified=listed)
        for k in ("a.jpg", "b.jpg", "c.jpg")
    ]
    done = {
        row_id("s3://bkt/a.jpg", "e", "m", ""),
        row_id("s3://bkt/a.jpg", "e", "m", QUESTION),
        row_id("s3://bkt/b.jpg", "e", "m", ""),
        row_id("s3://bkt/b.jpg", "e", "t", ""),
        row_id("s3://bkt/c.jpg", "e", "m", ""),
        row_id("s3://bkt/c.jpg", "e", "m", QUESTION),
        row_id("s3://bkt/c.jpg", "e", "t", ""),
    }
    pending, candidates = pending_items(
        "bkt", page, settings=Settings(model="m", tagger_model="t", prompt="ignored"),
        filters=Filters(), done_ids=lambda ids: done & set(ids), prompts=("", QUESTION),
        kinds=("caption", "tags"),
    )
    assert [(p.item.uri, p.kinds) for p in pending] == [
        ("s3://bkt/a.jpg", ("tags",)), ("s3://bkt/b.jpg", ("caption",))
    ]
    assert candidates == 3
