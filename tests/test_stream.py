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
from captioning.messages import CaptionJob, JobItem
from captioning.results import ResultsStore
from captioning.settings import Settings
from captioning.storage import Stores
from captioning.uris import allowed_location
from tests.imagefactory import awkward_images, hostile_files, photo_bytes
from workers.context import WorkerContext
from workers.images import decode_image
from workers.pipeline import ItemState, Stages, micro_batches
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
    job = CaptionJob(items=items, model=ctx.model.name, prompt="", source="cli")
    rows = process_job(job, ctx)

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
                     target_size=ctx.model.image_size).image
        for r in ok
    ]
    assert ctx.model.caption(decoded, "") == [r.caption for r in ok]


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
        return ctx.model.to_pixels(image)

    stages = Stages(**{**ctx.stages.__dict__, "to_pixels": slow_pixels})
    states = [ItemState(JobItem(uri=u), location=allowed_location(u, ctx.settings)) for u in uris]
    streamed = stages.stream(states, ahead=4)
    first = next(streamed)
    time.sleep(0.3)  # the consumer is slow: no more than the window may have been prepared
    prepared = sum(s.pixels is not None for s in states)
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
    job = CaptionJob(items=items, model=ctx.model.name, prompt="", source="cli")
    with pytest.raises(StoreUnavailable):
        process_job(job, broken)
