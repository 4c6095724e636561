"""Backfill: list a bucket prefix page by page, skip what is done, enqueue the rest.

Each page of up to 1,000 keys costs one listing call and one database query (not one per
key), and jobs are sent while listing goes on, so memory stays flat for any bucket size.
Sends pause while the bulk queue is deep (QueueGate). The checkpoint records the last key
sent: after every job, so `--resume` re-sends at most the one job in flight; or, when the
sender batches its Redis writes, after every page once the page's jobs are flushed, so an
interruption loses the unflushed jobs with the checkpoint that would have covered them and
`--resume` sends them again (re-sending a page only if it dies between flush and save).
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from captioning.checkpoints import Checkpoint, Checkpoints
from captioning.messages import CaptionJob, JobItem
from captioning.results import ResultsStore, row_id
from captioning.settings import Settings
from captioning.storage import ListedObject
from captioning.uris import ImageLocation
from producer.enqueue import JobSender
from producer.keys import is_image_key, s3_uri
from producer.pacing import QueueGate, RateLimiter

Lister = Callable[[str, str, str], Iterable[list[ListedObject]]]
"""(bucket, prefix, start_after) -> pages in key order: S3Store.list has this shape."""


@dataclass(frozen=True)
class Filters:
    """Which listed objects are candidates: image keys, modified since, matching a glob."""

    prefix: str = ""
    since: datetime | None = None
    match: str | None = None
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.match:
            object.__setattr__(self, "_pattern", re.compile(fnmatch.translate(self.match)))

    def accept(self, obj: ListedObject) -> bool:
        """The glob applies to the key below the prefix; `*` also crosses `/`."""
        if not is_image_key(obj.key):
            return False
        if self.since is not None and obj.last_modified < self.since:
            return False
        return self._pattern is None or bool(self._pattern.match(obj.key[len(self.prefix) :]))


@dataclass
class Pacing:
    gate: QueueGate | None = None
    rate: RateLimiter | None = None


def pending_items(
    bucket: str,
    page: Iterable[ListedObject],
    *,
    settings: Settings,
    filters: Filters,
    done_ids: Callable[[list[str]], set[str]] | None,
) -> tuple[list[JobItem], int]:
    """Candidates of one listing page with no row yet for this model and prompt, and the
    number of candidates. (pydantic-core validates a JobItem in less time than
    `model_construct` builds one, so they are validated.)"""
    items = [
        JobItem(uri=s3_uri(bucket, obj.key), etag=obj.etag or None)
        for obj in page
        if filters.accept(obj)
    ]
    candidates = len(items)
    if done_ids is None or not items:
        return items, candidates
    model, prompt = settings.model, settings.prompt
    ids = [row_id(item.uri, item.etag or "", model, prompt) for item in items]
    done = done_ids(ids)
    if done:
        items = [item for item, item_id in zip(items, ids, strict=True) if item_id not in done]
    return items, candidates


def backfill(
    source: ImageLocation,
    *,
    list_pages: Lister,
    results: ResultsStore | None,
    sender: JobSender | None,
    settings: Settings,
    batch_size: int,
    checkpoint: Checkpoint,
    checkpoints: Checkpoints | None = None,
    filters: Filters | None = None,
    pacing: Pacing | None = None,
    limit: int | None = None,
    on_progress: Callable[[Checkpoint], None] = lambda _checkpoint: None,
) -> Checkpoint:
    """List `source` after `checkpoint.last_key` and enqueue what is missing.

    `sender=None` is a dry run (nothing sent, no checkpoint saved). The returned checkpoint
    is `finished` when the listing (or `limit`) was exhausted.
    """
    filters = filters or Filters(prefix=source.key)
    pacing = pacing or Pacing()
    done_ids = results.existing_ids if results is not None else None
    bucket_uri_length = len(s3_uri(source.bucket, ""))
    model, prompt = settings.model, settings.prompt
    buffer: list[JobItem] = []

    def send(items: list[JobItem], last_key: str) -> None:
        if sender is not None:
            if pacing.gate is not None:
                pacing.gate.wait(len(items))
            if pacing.rate is not None:
                pacing.rate.acquire(len(items))
            sender.send(
                CaptionJob.model_construct(
                    items=tuple(items), model=model, prompt=prompt, source="backfill",
                    enqueued_at=time.time(),
                )
            )
        checkpoint.jobs += 1
        checkpoint.enqueued += len(items)
        checkpoint.last_key = last_key
        if sender is not None and not sender.batching:
            save()

    def save() -> None:
        """The jobs reach Redis first: a checkpoint never vouches for jobs still in a batch."""
        if sender is not None:
            sender.flush()
            if checkpoints is not None:
                checkpoints.save(checkpoint)

    exhausted = True
    for page in _pages(list_pages, source, checkpoint.last_key):
        items, candidates = pending_items(
            source.bucket, page, settings=settings, filters=filters, done_ids=done_ids
        )
        checkpoint.listed += len(page)
        checkpoint.images += candidates
        checkpoint.skipped += candidates - len(items)
        room = None if limit is None else limit - checkpoint.enqueued - len(buffer)
        truncated = room is not None and room < len(items)
        for item in items[:room] if truncated else items:
            buffer.append(item)
            if len(buffer) == batch_size:
                send(buffer, item.uri[bucket_uri_length:])
                buffer = []
        if not buffer and not truncated:
            checkpoint.last_key = page[-1].key  # the whole page is queued or skipped
        save()
        on_progress(checkpoint)
        if room is not None and room <= len(items):
            exhausted = False
            break
    if buffer:
        send(buffer, buffer[-1].uri[bucket_uri_length:])
    checkpoint.finished = exhausted
    save()
    on_progress(checkpoint)
    return checkpoint


def _pages(
    list_pages: Lister, source: ImageLocation, start_after: str
) -> Iterator[list[ListedObject]]:
    for page in list_pages(source.bucket, source.key, start_after):
        if page:
            yield page
