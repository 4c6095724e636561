"""Delivery bookkeeping around `caption_batch`: Redis keeps no delivery count, so we do.

Each delivery INCRs `captioner:deliveries:<task id>` before the task body runs; the count is
deleted when the body ends on its own (rows written, a retry scheduled, dead-lettered). A
count still there at the next delivery means the last one died with its pool process
(kill -9, the OOM killer, the hard time limit). Past `max_deliveries` the job is not run
again: a many-image job is split into one-image jobs, so a poison image is isolated and
its neighbours still caption, and a one-image job becomes a `failed` row saying why.

A `done` marker, set once the rows are written, lets a redelivery of a finished job (its
ack was lost with its worker, or it came back after the visibility timeout) be acked
without captioning again. The bookkeeping fails open: if Redis cannot count, the job runs,
and the idempotent upsert still keeps one row per image.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, Retry

from captioning import metrics
from captioning.broker import send_job
from captioning.connections import redis_client
from captioning.deadletters import DeadLetters
from captioning.errors import InvalidJob, UriRefused, WorkerLost
from captioning.keys import deliveries_key, done_key
from captioning.kinds import row_prompts
from captioning.messages import CaptionJob
from captioning.results import CaptionRow, utcnow
from captioning.settings import Settings, get_settings
from captioning.uris import parse_uri

log = logging.getLogger(__name__)

class DeliveryLedger:
    """Delivery counts and done markers per task id, with TTLs so nothing piles up."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._redis = client
        # A count must outlive every redelivery, each up to one visibility timeout apart.
        self._count_ttl = settings.visibility_timeout_s * (settings.max_deliveries + 2)
        # A finished job's message can come back at most one visibility timeout later.
        self._done_ttl = settings.visibility_timeout_s * 2

    def start(self, task_id: str) -> int:
        """Count this delivery; returns how many deliveries have started and not finished."""
        key = deliveries_key(task_id)
        pipe = self._redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, self._count_ttl)
        count, _ = pipe.execute()
        return int(count)

    def finish(self, task_id: str, *, done: bool) -> None:
        """Clear the count (and mark the job done). Fails open: the work is already safe."""
        pipe = self._redis.pipeline()
        if done:
            pipe.set(done_key(task_id), 1, ex=self._done_ttl)
        pipe.delete(deliveries_key(task_id))
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("cannot record the end of job %s (%s)", task_id, exc)

    def is_done(self, task_id: str) -> bool:
        return bool(self._redis.exists(done_key(task_id)))


_ledger: DeliveryLedger | None = None


def get_ledger(settings: Settings) -> DeliveryLedger:
    global _ledger  # noqa: PLW0603 - one client per process, by design
    if _ledger is None:
        _ledger = DeliveryLedger(redis_client(settings.broker_url), settings)
    return _ledger


def split_job(job: CaptionJob, size: int) -> Iterator[CaptionJob]:
    """The job's items in order, `size` at a time; model, prompt and enqueue time kept."""
    for start in range(0, len(job.items), size):
        yield job.model_copy(update={"items": job.items[start : start + size]})


def lost_rows(job: CaptionJob, error: WorkerLost, worker: str) -> list[CaptionRow]:
    """One `failed` row per item, kind and prompt of a job that is not run again, saying why."""
    finished = utcnow()
    rows = []
    for item in job.items:
        try:
            location = parse_uri(item.uri)
            bucket, key = location.bucket, location.key
        except UriRefused:
            bucket, key = "", ""
        rows.extend(
            CaptionRow(
                uri=item.uri, bucket=bucket, key=key, etag=item.etag or "",
                version_id=item.version_id, model=model, prompt=prompt,
                status="failed", caption=None, error=f"WorkerLost: {error}",
                width=None, height=None, bytes=None,
                enqueued_at=datetime.fromtimestamp(job.enqueued_at, UTC),
                finished_at=finished, worker=worker, kind=kind,
            )
            for kind, model in job.annotators.items()
            for prompt in row_prompts(kind, job.all_prompts)
        )
    return rows


class GuardedTask(Task):
    """Base class of `caption_batch`: counts deliveries, skips finished jobs, stops loops.

    The worker's tracer has already pushed the request when it calls `__call__`, so the body
    is run with `self.run` (Task.__call__ would push a second, empty request).
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        settings = get_settings()
        task_id = str(self.request.id)
        queue = str((self.request.delivery_info or {}).get("routing_key") or "unknown")
        ledger = get_ledger(settings)
        try:
            if ledger.is_done(task_id):
                log.info("job %s was already written; acking its redelivery", task_id)
                metrics.JOBS.labels("skipped", queue).inc()
                return {"ok": 0, "failed": 0}
            deliveries = ledger.start(task_id)
        except redis.RedisError as exc:
            log.warning("cannot count deliveries (%s); running the job anyway", exc)
            return self.run(*args, **kwargs)
        try:
            result = self._guarded_run(args, kwargs, task_id=task_id, deliveries=deliveries,
                                       queue=queue, settings=settings)
        except Retry:
            ledger.finish(task_id, done=False)
            raise
        except Exception as exc:
            # The body handles every failure it knows (retry, dead letter); what escapes is
            # the broker or database failing under it, or under a split or a dead letter.
            # Requeue and keep the count, so even this is bounded.
            log.error("job %s could not be finished (%s); returning it to the queue", task_id,
                      exc)
            raise Reject(str(exc), requeue=True) from exc
        ledger.finish(task_id, done=True)
        return result

    def _guarded_run(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, task_id: str,
        deliveries: int, queue: str, settings: Settings,
    ) -> Any:
        """The body, unless the message is malformed, redelivered too often or too big."""
        if len(args) != 1 or kwargs:
            reason = "a caption_batch message takes exactly one argument, the CaptionJob"
            self._dead_letter({"args": args, "kwargs": kwargs}, reason, queue, settings)
            return {"ok": 0, "failed": 0}
        job = _job_or_none(args[0])
        if deliveries > settings.max_deliveries:
            if job is None:
                reason = f"delivered {deliveries - 1} times, never finished"
                self._dead_letter(args[0], reason, queue, settings)
            else:
                self._stop_redelivering(job, task_id, deliveries, queue, settings)
            return {"ok": 0, "failed": 0}
        if job is not None and len(job.items) > settings.max_job_items:
            self._split(job, task_id, settings.max_job_items, queue)
            log.info("job %s has %d items: split into jobs of %d", task_id, len(job.items),
                     settings.max_job_items)
            return {"ok": 0, "failed": 0}
        return self.run(*args, **kwargs)

    def _stop_redelivering(
        self, job: CaptionJob, task_id: str, deliveries: int, queue: str, settings: Settings
    ) -> None:
        if len(job.items) > 1:
            self._split(job, task_id, 1, queue)
            log.error("job %s died with its worker %d times: split into %d one-image jobs",
                      task_id, deliveries - 1, len(job.items))
            metrics.JOBS.labels("split", queue).inc()
            return
        from workers.context import get_context

        error = WorkerLost(
            f"the job was delivered {deliveries - 1} times and its worker died each time "
            f"(crash, out of memory, or over the {settings.job_deadline_s} s job time limit); "
            "it is not run again"
        )
        ctx = get_context(settings)
        ctx.writer.write(lost_rows(job, error, ctx.name), main_prompt=job.all_prompts[0])
        log.error("job %s: %s; recorded as failed", task_id, error)
        metrics.JOBS.labels("lost", queue).inc()
        for kind in job.annotators:
            metrics.IMAGES.labels("failed", queue, kind).inc(len(job.items))
            metrics.IMAGE_ERRORS.labels("WorkerLost", kind).inc(len(job.items))

    def _dead_letter(
        self, payload: object, reason: str, queue: str, settings: Settings
    ) -> None:
        log.warning("message from %s moved to dead letters: %s", queue, reason)
        DeadLetters(redis_client(settings.broker_url)).push(payload, reason=reason, queue=queue)
        metrics.JOBS.labels("invalid", queue).inc()

    def _split(self, job: CaptionJob, task_id: str, size: int, queue: str) -> None:
        """Deterministic child ids: splitting again after a crash makes the same children,
        whose done markers then stop them from running twice."""
        with self.app.producer_or_acquire() as producer:
            for index, part in enumerate(split_job(job, size)):
                send_job(self.app, part, queue, producer=producer, task_id=f"{task_id}.{index}")


def _job_or_none(payload: object) -> CaptionJob | None:
    """The job, if the message holds a valid one; the body dead-letters the rest."""
    try:
        return CaptionJob.from_message(payload)
    except InvalidJob:
        return None
