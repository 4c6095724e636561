"""Backfill: list a bucket prefix page by page, skip what is done, enqueue the rest.

Each page of up to 1,000 keys costs one listing call and one database query (not one per
key), and jobs are sent while listing goes on, so memory stays flat for any bucket size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import PurePosixPath

from captioning.messages import JobItem
from captioning.results import ResultsStore, row_id
from captioning.settings import Settings
from captioning.storage import ListedObject, S3Store
from captioning.uris import ImageLocation
from producer.enqueue import JobSender, make_jobs

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif"}
)


def is_image_key(key: str) -> bool:
    return PurePosixPath(key).suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class BackfillReport:
    listed: int = 0
    images: int = 0
    skipped: int = 0
    enqueued: int = 0
    jobs: int = 0
    sample: list[str] = field(default_factory=list)


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def pending_items(
    bucket: str,
    page: Iterable[ListedObject],
    *,
    settings: Settings,
    done_ids: Callable[[list[str]], set[str]] | None,
) -> list[JobItem]:
    """Images of one listing page that have no row yet for this model and prompt."""
    items = [
        JobItem(uri=s3_uri(bucket, obj.key), etag=obj.etag or None)
        for obj in page
        if is_image_key(obj.key)
    ]
    if done_ids is None or not items:
        return items
    ids = [row_id(item.uri, item.etag or "", settings.model, settings.prompt) for item in items]
    done = done_ids(ids)
    return [item for item, item_id in zip(items, ids, strict=True) if item_id not in done]


def backfill(
    source: ImageLocation,
    *,
    store: S3Store,
    results: ResultsStore | None,
    sender: JobSender | None,
    settings: Settings,
    batch_size: int,
    limit: int | None = None,
    on_progress: Callable[[BackfillReport], None] = lambda _report: None,
) -> BackfillReport:
    """List `source` and enqueue what is missing; `sender=None` is a dry run."""
    report = BackfillReport()
    done_ids = results.existing_ids if results is not None else None

    def pending() -> Iterator[JobItem]:
        for page in store.list(source.bucket, source.key):
            report.listed += len(page)
            images = sum(is_image_key(obj.key) for obj in page)
            items = pending_items(source.bucket, page, settings=settings, done_ids=done_ids)
            report.images += images
            report.skipped += images - len(items)
            yield from items
            on_progress(report)

    jobs = make_jobs(
        islice(pending(), limit),
        batch_size=batch_size,
        model=settings.model,
        prompt=settings.prompt,
        source="backfill",
    )
    for job in jobs:
        if sender is not None:
            sender.send(job)
        report.jobs += 1
        report.enqueued += len(job.items)
        report.sample.extend(item.uri for item in job.items[: max(0, 10 - len(report.sample))])
    return report
