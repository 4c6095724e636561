"""refs -> CaptionJobs -> broker, many images per message over one connection."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from itertools import islice
from types import TracebackType

from celery import Celery

from captioning.broker import send_job
from captioning.kinds import annotators
from captioning.messages import CaptionJob, JobItem, Source
from captioning.settings import Settings

PUBLISH_BATCH = 64
"""Jobs per Redis pipeline for bulk producers (enqueue --from-file, backfills)."""


def batched(items: Iterable[JobItem], size: int) -> Iterator[tuple[JobItem, ...]]:
    iterator = iter(items)
    while chunk := tuple(islice(iterator, size)):
        yield chunk


def make_jobs(
    items: Iterable[JobItem],
    *,
    batch_size: int,
    annotators: Mapping[str, str],
    prompts: Sequence[str],
    source: Source,
) -> Iterator[CaptionJob]:
    """Jobs of `batch_size` items, each asking for every kind -> model of `annotators`."""
    for chunk in batched(items, batch_size):
        yield CaptionJob.create(items=chunk, annotators=annotators, prompts=prompts, source=source)


class JobSender:
    """Publishes jobs on one pooled broker connection; use it as a context manager.

    With `batch=N`, LPUSHes go out in Redis pipelines of N (kombu's publish batch) instead of
    one round trip per job: a job is in Redis only after `flush()` (or leaving the context),
    so callers that promise "queued" (checkpoints) flush first. `batch=0` sends each at once.
    """

    def __init__(self, app: Celery, queue: str, *, batch: int = 0) -> None:
        self._app = app
        self._queue = queue
        self._context = app.producer_or_acquire()
        self._batch_size = batch
        self._batch: AbstractContextManager[object] | None = None
        self.jobs_sent = 0
        self.images_sent = 0

    def __enter__(self) -> JobSender:
        self._producer = self._context.__enter__()
        self._start_batch()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._batch is not None:
                self._batch.__exit__(exc_type, exc, tb)
        finally:
            self._context.__exit__(exc_type, exc, tb)

    @property
    def batching(self) -> bool:
        return self._batch is not None

    def flush(self) -> None:
        """Make every job sent so far reach Redis."""
        if self._batch is not None:
            self._batch.__exit__(None, None, None)
            self._start_batch()

    def _start_batch(self) -> None:
        if self._batch_size and self._producer.supports_batch_publish:
            self._batch = self._producer.batch(max_size=self._batch_size)
            self._batch.__enter__()

    def send(self, job: CaptionJob) -> None:
        send_job(self._app, job, self._queue, producer=self._producer,
                 declare=not self.jobs_sent)
        self.jobs_sent += 1
        self.images_sent += len(job.items)


def enqueue_uris(
    uris: Iterable[str],
    sender: JobSender,
    settings: Settings,
    *,
    batch_size: int,
    source: Source = "cli",
    kinds: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
) -> None:
    """Send the URIs as they come, asking for `kinds` (default CAPTIONER_KINDS) with
    `prompts` (default CAPTIONER_PROMPT alone); validation of each URI is the worker's job
    (one row each per kind and prompt)."""
    items = (JobItem(uri=uri) for uri in uris)
    wanted = annotators(settings, kinds or settings.kinds)
    for job in make_jobs(
        items,
        batch_size=batch_size,
        annotators=wanted,
        prompts=prompts or (settings.prompt,),
        source=source,
    ):
        sender.send(job)
