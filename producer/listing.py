"""Listing faster than one stream: pages fetched ahead, and disjoint parts listed in parallel.

A part is a sub-prefix (from the delimiter, or given) or an S3 Inventory data file. Each part
is one `backfill()` with its own checkpoint (`<name>#<part>`), so `--resume` is exact per
part however the threads interleaved; a finished part is not listed again. The parts share
the queue-depth gate, the rate limit, the results database and the broker's connection pool.
Within a part, the next listing page is fetched by a thread while this one is checked against
the database and enqueued.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from celery import Celery

from captioning.checkpoints import Checkpoint, Checkpoints
from captioning.storage import ListedObject, S3Store
from captioning.uris import ImageLocation
from producer.backfill import Lister, backfill
from producer.enqueue import PUBLISH_BATCH, JobSender
from producer.inventory import Manifest, file_pages
from producer.keys import s3_location

PREFETCH_PAGES = 2
_DONE = object()


def prefetched(pages: Iterable[list[ListedObject]], depth: int = PREFETCH_PAGES
               ) -> Iterator[list[ListedObject]]:
    """`pages`, fetched by a thread up to `depth` pages ahead of the caller. A listing error is
    raised to the caller; closing the iterator early stops the thread."""
    ahead: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def fetch() -> None:
        try:
            for page in pages:
                while not stop.is_set():
                    try:
                        ahead.put(page, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ahead.put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            ahead.put(exc)

    thread = threading.Thread(target=fetch, name="list-ahead", daemon=True)
    thread.start()
    try:
        while (item := ahead.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()


def pipelined(list_pages: Lister) -> Lister:
    return lambda bucket, prefix, start_after: prefetched(list_pages(bucket, prefix, start_after))


@dataclass(frozen=True)
class Part:
    """One disjoint slice of a backfill: what to list, and under which checkpoint suffix."""

    label: str
    source: ImageLocation
    list_pages: Lister


def prefix_parts(store: S3Store, source: ImageLocation, given: Sequence[str] = ()) -> list[Part]:
    """Split `source` on `/`: one part per sub-prefix, plus one for the objects directly in it.
    With `given` sub-prefixes (relative to the source), exactly those parts."""
    if given:
        subs = [source.key + sub for sub in given]
        direct: list[Part] = []
    else:
        subs, has_direct = store.common_prefixes(source.bucket, source.key)
        direct = [Part("", source, store.list_direct)] if has_direct else []
    located = [s3_location(source.bucket, sub) for sub in subs]
    return direct + [Part(loc.key[len(source.key):], loc, store.list) for loc in located]


def part_checkpoint(name: str, source: str, part: Part) -> Checkpoint:
    return Checkpoint(name=f"{name}#{part.label}", source=f"{source}#{part.label}")


def run_parts(
    parts: Sequence[Part],
    run_one: Callable[[Part, Checkpoint], Checkpoint],
    *,
    checkpoints: Checkpoints | None,
    name: str,
    source: str,
    workers: int,
    resume: bool,
) -> list[Checkpoint]:
    """Back-fill every part, `workers` at a time; each resumes from its own checkpoint."""

    def one(part: Part) -> Checkpoint:
        checkpoint = part_checkpoint(name, source, part)
        saved = checkpoints.get(checkpoint.name) if resume and checkpoints else None
        if saved is not None:
            if saved.finished:
                return saved
            checkpoint = saved
        return run_one(part, checkpoint)

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="list") as pool:
        return list(pool.map(one, parts))


class Totals:
    """The sum of the parts' checkpoints, for progress and the closing line (thread-safe)."""

    def __init__(self, name: str, source: str) -> None:
        self.checkpoint = Checkpoint(name=name, source=source)
        self._parts: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()

    def update(self, part: Checkpoint) -> Checkpoint:
        with self._lock:
            self._parts[part.name] = part
            for counter in ("listed", "images", "skipped", "enqueued", "jobs"):
                setattr(self.checkpoint, counter,
                        sum(getattr(cp, counter) for cp in self._parts.values()))
            self.checkpoint.finished = all(cp.finished for cp in self._parts.values())
            self.checkpoint.last_key = part.last_key
            return self.checkpoint


def backfill_parts(
    parts: Sequence[Part],
    *,
    app: Celery | None,
    queue_name: str,
    name: str,
    source: str,
    workers: int,
    resume: bool,
    checkpoints: Checkpoints | None,
    on_progress: Callable[[Checkpoint], None] = lambda _checkpoint: None,
    **backfill_options: Any,
) -> Checkpoint:
    """`backfill()` over every part, pipelined, `workers` parts at a time, each on its own
    broker connection (`app=None`: a dry run). Returns the totals of all parts."""
    totals = Totals(name, source)

    def run_one(part: Part, checkpoint: Checkpoint) -> Checkpoint:
        def run(sender: JobSender | None) -> Checkpoint:
            return backfill(
                part.source, list_pages=pipelined(part.list_pages), sender=sender,
                checkpoint=checkpoint, checkpoints=checkpoints,
                on_progress=lambda cp: on_progress(totals.update(cp)), **backfill_options,
            )

        if app is None:
            return run(None)
        with JobSender(app, queue_name, batch=PUBLISH_BATCH) as sender:
            return run(sender)

    for done in run_parts(parts, run_one, checkpoints=checkpoints, name=name, source=source,
                          workers=workers, resume=resume):
        totals.update(done)
    return totals.checkpoint


def inventory_parts(store: S3Store, manifest: Manifest, prefix: str) -> list[Part]:
    """One part per data file of an S3 Inventory report, keys filtered to `prefix`."""
    source = s3_location(manifest.source_bucket, prefix)

    def lister(data_file: ImageLocation) -> Lister:
        return lambda _bucket, under, start_after: file_pages(
            store, manifest, data_file, under, start_after
        )

    return [
        Part(data_file.key.rsplit("/", 1)[-1], source, lister(data_file))
        for data_file in manifest.files
    ]
