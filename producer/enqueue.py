"""refs -> CaptionJobs -> broker, many images per message over one connection."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from types import TracebackType

from celery import Celery

from captioning.broker import send_job
from captioning.kinds import annotators
from captioning.messages import CaptionJob, JobItem, Source
from captioning.settings import Settings


def batched(items: Iterable[JobItem], size: int) -> Iterator[tuple[JobItem, ...]]:
    iterator = iter(items)
    while chunk := tuple(islice(iterator, size)):
        yield chunk


def make_jobs(
    items: Iterable[JobItem],
    *,
    batch_size: int,
    annotators: Mapping[str, str],
    prompt: str,
    source: Source,
) -> Iterator[CaptionJob]:
    """Jobs of `batch_size` items, each asking for every kind -> model of `annotators`."""
    for chunk in batched(items, batch_size):
        yield CaptionJob.create(items=chunk, annotators=annotators, prompt=prompt, source=source)


class JobSender:
    """Publishes jobs on one pooled broker connection; use it as a context manager."""

    def __init__(self, app: Celery, queue: str) -> None:
        self._app = app
        self._queue = queue
        self._context = app.producer_or_acquire()
        self.jobs_sent = 0
        self.images_sent = 0

    def __enter__(self) -> JobSender:
        self._producer = self._context.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._context.__exit__(exc_type, exc, tb)

    def send(self, job: CaptionJob) -> None:
        send_job(self._app, job, self._queue, producer=self._producer)
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
) -> None:
    """Send the URIs as they come, asking for `kinds` (default CAPTIONER_KINDS); validation
    of each URI is the worker's job (one row each per kind)."""
    items = (JobItem(uri=uri) for uri in uris)
    wanted = annotators(settings, kinds or settings.kinds)
    for job in make_jobs(
        items, batch_size=batch_size, annotators=wanted, prompt=settings.prompt, source=source
    ):
        sender.send(job)
