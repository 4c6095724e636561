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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from captioning.checkpoints import Checkpoint, Checkpoints
from captioning.kinds import KINDS, annotators, row_prompts
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

    def wait(self, images: int) -> None:
        """Return once `images` more may be sent: room in the queue, then the rate."""
        if self.gate is not None:
            self.gate.wait(images)
        if self.rate is not None:
            self.rate.acquire(images)


@dataclass(frozen=True)
class Pending:
    """A listed image and the kinds it has no row for yet."""

    item: JobItem
    kinds: tuple[str, ...]


def pending_items(
    bucket: str,
    page: Iterable[ListedObject],
    *,
    settings: Settings,
    filters: Filters,
    done_ids: Callable[[list[str]], set[str]] | None,
    kinds: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
) -> tuple[list[Pending], int]:
    """Candidates of one listing page missing a row for any of `kinds` (default
    CAPTIONER_KINDS: each kind's model, and each of `prompts` the kind reads, default
    CAPTIONER_PROMPT), and the number of candidates. (pydantic-core validates a JobItem in
    less time than `model_construct` builds one, so they are validated.)"""
    wanted = tuple(kinds or settings.kinds)
    prompts = tuple(prompts or (settings.prompt,))
    items = [
        JobItem(uri=s3_uri(bucket, obj.key), etag=obj.etag or None)
        for obj in page
        if filters.accept(obj)
    ]
    candidates = len(items)
    if done_ids is None or not items:
        return [Pending(item, wanted) for item in items], candidates
    keys = {
        kind: [(KINDS[kind].model(settings), prompt) for prompt in row_prompts(kind, prompts)]
        for kind in wanted
    }
    ids = {
        (item.uri, kind): [row_id(item.uri, item.etag or "", *key) for key in keys[kind]]
        for item in items
        for kind in wanted
    }
    done = done_ids([one for per_kind in ids.values() for one in per_kind])
    pending = []
    for item in items:
        # A kind misses when any of its prompts does; its job then covers them all (one
        # vision pass makes the others nearly free).
        missing = tuple(kind for kind in wanted if not done.issuperset(ids[item.uri, kind]))
        if missing:
            pending.append(Pending(item, missing))
    return pending, candidates


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
    kinds: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
) -> Checkpoint:
    """List `source` after `checkpoint.last_key` and enqueue what is missing, for every
    one of `prompts` (default: CAPTIONER_PROMPT alone).

    Each job asks for the kinds its images miss (of `kinds`, default CAPTIONER_KINDS); a
    job is cut where that set changes, so no kind is asked of an image twice.
    `sender=None` is a dry run (nothing sent, no checkpoint saved). The returned checkpoint
    is `finished` when the listing (or `limit`) was exhausted.
    """
    filters = filters or Filters(prefix=source.key)
    pacing = pacing or Pacing()
    done_ids = results.existing_ids if results is not None else None
    bucket_uri_length = len(s3_uri(source.bucket, ""))
    prompts = tuple(prompts or (settings.prompt,))
    buffer: list[JobItem] = []
    buffer_kinds: tuple[str, ...] = ()

    def send(items: list[JobItem], last_key: str) -> None:
        if sender is not None:
            pacing.wait(len(items))
            sender.send(
                CaptionJob.create(
                    items=tuple(items), annotators=annotators(settings, buffer_kinds),
                    prompts=prompts, source="backfill",
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
            source.bucket, page, settings=settings, filters=filters, done_ids=done_ids,
            kinds=kinds, prompts=prompts,
        )
        checkpoint.listed += len(page)
        checkpoint.images += candidates
        checkpoint.skipped += candidates - len(items)
        room = None if limit is None else limit - checkpoint.enqueued - len(buffer)
        truncated = room is not None and room < len(items)
        for pending in items[:room] if truncated else items:
            if buffer and pending.kinds != buffer_kinds:
                send(buffer, buffer[-1].uri[bucket_uri_length:])
                buffer = []
            buffer_kinds = pending.kinds
            buffer.append(pending.item)
            if len(buffer) == batch_size:
                send(buffer, pending.item.uri[bucket_uri_length:])
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
