"""The pipelined stages on real files and the tiny model: order, one row per item, failures
mixed in, a bounded window, transient errors ending the job."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.errors import StoreUnavailable, UndecodableImage
from captioning.messages import BULK_QUEUE, REALTIME_QUEUE, CaptionJob, JobItem
from captioning.results import ResultsStore
from captioning.settings import Settings
from captioning.storage import Stores
from captioning.uris import allowed_location
from tests.imagefactory import awkward_images, hostile_files, photo_bytes
from workers.context import WorkerContext
from workers.images import decode_image
from workers.pipeline import ItemState, Stages, micro_batches
from workers.runtimes.blip2 import CaptionModel
from workers.tasks import process_job


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stream-images").resolve()


@pytest.fixture(scope="module")
def ctx(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerContext]:
    db = tmp_path_factory.mktemp("db") / "captions.db"
    settings = Settings(
        model="tiny-random-blip2", device="cpu", database_url=f"sqlite:///{db}",
        allowed_roots=(root,), batch_size=3, max_new_tokens=6, fetch_concurrency=4,
        max_image_bytes=2_000_000, max_image_pixels=20_000_000,
    )
    ResultsStore(settings.database_url).create_schema()
    context = WorkerContext.create(settings)
    yield context
    context.close()


def caption_model(ctx: WorkerContext) -> CaptionModel:
    model = ctx.runtimes["caption"]
    assert isinstance(model, CaptionModel)
    return model


def mixed_files(root: Path) -> dict[str, str | None]:
    """name -> expected error class (None: captions), interleaved good and bad."""
    good = {**photo_bytes(), **awkward_images()}
    bad = hostile_files(2_000_000)
    expected: dict[str, str | None] = {}
    bad_items = iter(bad.items())
    for i, (name, data) in enumerate(good.items()):
        (root / name).write_bytes(data)
        expected[name] = None
        if i % 2 == 0 and (item := next(bad_items, None)):
            (root / item[0]).write_bytes(item[1][0])
            expected[item[0]] = item[1][1]
    expected["missing.jpg"] = "ObjectMissing"
    return expected


def test_one_row_per_item_in_order_with_failures_mixed_in(
    ctx: WorkerContext, root: Path
) -> None:
    expected = mixed_files(root)
    uris = [(root / name).as_uri() for name in expected] + ["http://example.com/x.jpg"]
    items = tuple(JobItem(uri=u) for u in uris)
    job = CaptionJob(items=items, model=ctx.runtimes["caption"].name, prompt="", source="cli")
    rows = process_job(job, ctx, BULK_QUEUE).rows

    assert [row.uri for row in rows] == uris
    for row, error in zip(rows, [*expected.values(), "UriRefused"], strict=True):
        if error is None:
            assert row.status == "ok" and row.caption is not None, row.error
        else:
            assert row.status == "failed" and row.error and row.error.startswith(error), row
    # The captions the model gives the same decoded images directly, whatever the batching.
    ok = [row for row in rows if row.status == "ok"]
    decoded = [
        decode_image((root / Path(r.key).name).read_bytes(), max_pixels=20_000_000,
                     target_size=ctx.runtimes["caption"].image_size).image
        for r in ok
    ]
    assert caption_model(ctx).caption(decoded, "") == [r.caption for r in ok]


def test_the_window_bounds_work_in_flight(ctx: WorkerContext, root: Path) -> None:
    data = photo_bytes()["rocket.jpg"]
    uris = []
    for i in range(20):
        (root / f"w{i}.jpg").write_bytes(data)
        uris.append((root / f"w{i}.jpg").as_uri())
    active, peak, lock = 0, 0, threading.Lock()

    def slow_pixels(image: Image.Image) -> np.ndarray:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.02)
        with lock:
            active -= 1
        return ctx.runtimes["caption"].to_pixels(image)

    stages = Stages(**{**ctx.stages.__dict__, "to_pixels": {"caption": slow_pixels}})
    states = [ItemState(JobItem(uri=u), location=allowed_location(u, ctx.settings)) for u in uris]
    streamed = stages.stream(states, ahead=4)
    first = next(streamed)
    time.sleep(0.3)  # the consumer is slow: no more than the window may have been prepared
    prepared = sum(bool(s.pixels) for s in states)
    assert first is states[0]
    assert prepared <= 1 + 4
    assert [first, *streamed] == states
    assert peak <= ctx.decode_pool._max_workers


def test_micro_batches_skip_failures_and_follow_the_size() -> None:
    states = [ItemState(JobItem(uri=f"file:///{i}")) for i in range(7)]
    states[1].error = states[4].error = UndecodableImage("not an image")
    size = [2]
    batches = []
    for batch in micro_batches(states, lambda: size[0]):
        batches.append([states.index(s) for s in batch])
        size[0] = 3  # the model lowered or raised it: the next batch follows
    assert batches == [[0, 2], [3, 5, 6]]


def test_a_store_outage_fails_the_whole_job(ctx: WorkerContext) -> None:
    settings = ctx.settings.model_copy(update={
        "s3_endpoint_url": "http://127.0.0.1:9", "allowed_buckets": ("photos",),
    })
    stages = Stages(**{**ctx.stages.__dict__, "stores": Stores(settings)})
    broken = WorkerContext(**{**ctx.__dict__, "settings": settings, "stages": stages})
    items = (JobItem(uri="s3://photos/a.jpg"),)
    job = CaptionJob(items=items, model=ctx.runtimes["caption"].name, prompt="", source="cli")
    with pytest.raises(StoreUnavailable):
        process_job(job, broken, BULK_QUEUE)


@pytest.fixture(scope="module")
def both(ctx: WorkerContext) -> Iterator[WorkerContext]:
    """A worker serving caption and tags (the tiny twins)."""
    settings = ctx.settings.model_copy(
        update={"kinds": ("caption", "tags"), "tagger_model": "tiny-random-wd14",
                "tagger_batch_size": 2}
    )
    context = WorkerContext.create(settings)
    yield context
    context.close()


class CountingStages(Stages):
    def prepare(self, state: ItemState) -> None:
        self.__dict__.setdefault("prepared", []).append(state.item.uri)
        super().prepare(state)


def test_several_kinds_share_one_fetch_and_decode(both: WorkerContext, root: Path) -> None:
    expected = mixed_files(root)
    uris = [(root / name).as_uri() for name in expected]
    tagger = both.runtimes["tags"]
    job = CaptionJob.create(
        items=tuple(JobItem(uri=u) for u in uris),
        annotators={"caption": "tiny-random-blip2", "tags": "tiny-random-wd14"},
        prompts=("Question: what is it? Answer:",), source="cli",
    )
    assert both.stages.target_size is None  # the tagger's exact preprocessing: full resolution
    stages = CountingStages(**both.stages.__dict__)
    outcome = process_job(job, WorkerContext(**{**both.__dict__, "stages": stages}), BULK_QUEUE)

    assert sorted(stages.__dict__["prepared"]) == sorted(uris)  # once per image, not per kind
    assert outcome.forward == []
    assert len(outcome.rows) == 2 * len(uris)
    by_kind = {kind: [r for r in outcome.rows if r.kind == kind] for kind in ("caption", "tags")}
    for rows in by_kind.values():
        assert [r.uri for r in rows] == uris
        for r, error in zip(rows, expected.values(), strict=True):
            assert (r.status == "ok") is (error is None), r
    tags = [r for r in by_kind["tags"] if r.status == "ok"]
    assert all(r.model == "tiny-random-wd14" and r.prompt == "" for r in tags)
    assert all(r.prompt == job.prompt for r in by_kind["caption"])
    decoded = [decode_image((root / Path(r.key).name).read_bytes(), max_pixels=20_000_000).image
               for r in tags]
    direct = tagger.annotate([tagger.to_pixels(image) for image in decoded], "")
    assert [r.caption for r in tags] == [a.text for a in direct]
    assert [r.tags for r in tags] == [a.tags for a in direct]


def test_a_job_prepares_images_only_for_the_kinds_it_asks_for(both: WorkerContext) -> None:
    captioner = both.runtimes["caption"]
    caption_only = both.stages.for_kinds(["caption"])

    assert both.stages.target_size is None  # the tagger takes full resolution
    assert caption_only.target_size == captioner.decode_size is not None
    assert list(caption_only.to_pixels) == ["caption"]
    assert both.stages.for_kinds(["tags", "caption"]) is both.stages


def test_a_kind_not_served_is_forwarded_to_its_queue(ctx: WorkerContext, root: Path) -> None:
    (root / "fwd.png").write_bytes(photo_bytes()["chelsea.png"])
    job = CaptionJob.create(
        items=(JobItem(uri=(root / "fwd.png").as_uri()),),
        annotators={"caption": "tiny-random-blip2", "tags": "some/tagger"},
        prompts=("",), source="backfill",
    )
    outcome = process_job(job, ctx, REALTIME_QUEUE)
    assert [(r.kind, r.status) for r in outcome.rows] == [("caption", "ok")]
    [(queue, forwarded)] = outcome.forward
    assert queue == "captions.kind.tags"
    assert forwarded.annotators == {"tags": "some/tagger"}
    assert (forwarded.items, forwarded.enqueued_at, forwarded.source) == (
        job.items, job.enqueued_at, "backfill")


def test_prompts_go_to_the_caption_kind_only(both: WorkerContext, root: Path) -> None:
    """Two prompts with caption + tags: two caption rows per image (each equal to captioning
    with that prompt alone), one tags row keyed with prompt '', failures for every row."""
    photos = photo_bytes()
    names = ["astronaut.png", "coffee.png"]
    for name in names:
        (root / f"p-{name}").write_bytes(photos[name])
    (root / "p-broken.jpg").write_bytes(b"not an image")
    uris = [(root / f"p-{name}").as_uri() for name in [*names, "broken.jpg"]]
    prompts = ("", "Question: what is it? Answer:")
    job = CaptionJob.create(
        items=tuple(JobItem(uri=u) for u in uris),
        annotators={"caption": "tiny-random-blip2", "tags": "tiny-random-wd14"},
        prompts=prompts, source="cli",
    )
    rows = process_job(job, both, BULK_QUEUE).rows

    keys = sorted((r.uri, r.kind, r.prompt) for r in rows)
    assert keys == sorted(
        [(u, "caption", p) for u in uris for p in prompts] + [(u, "tags", "") for u in uris]
    )
    assert all(r.status == "failed" and "UndecodableImage" in (r.error or "")
               for r in rows if r.uri == uris[2])
    captioner = caption_model(both)
    decoded = [decode_image(photos[name], max_pixels=20_000_000).image for name in names]
    for prompt in prompts:
        alone = captioner.caption(decoded, prompt)
        assert [r.caption for r in rows if r.kind == "caption" and r.prompt == prompt
                and r.status == "ok"] == alone
