"""`captioning.caption_batch`: one CaptionJob, top to bottom.

check URIs -> fetch + decode (threads, a window ahead of the model) -> generate (micro-batches,
in order, one job on the model at a time) -> rows. Every item ends as exactly one row: an
image's own problem becomes a `failed` row, while infrastructure failures raise TransientError
so the whole job is retried; rows are written before the task returns, and Celery acks only
then (acks_late). Delivery counting, poison isolation and the redelivery skip wrap this task
(workers/delivery.py). Under the threads pool a worker holds `jobs_in_flight` jobs sharing
one model, so one job's fetch, decode and write overlap another's generation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from celery import Task

from captioning import metrics
from captioning.deadletters import DeadLetters
from captioning.errors import ImageError, InvalidJob, ModelMismatch, TransientError
from captioning.messages import TASK_NAME, CaptionJob
from captioning.results import CaptionRow, Status, utcnow
from captioning.settings import get_settings
from captioning.uris import allowed_location
from workers.app import app
from workers.context import WorkerContext, get_context
from workers.delivery import GuardedTask
from workers.pipeline import ItemState, caption_stream
from workers.retry import backoff_seconds

log = logging.getLogger(__name__)

MAX_JOB_RETRIES = get_settings().max_job_retries


def process_job(job: CaptionJob, ctx: WorkerContext) -> list[CaptionRow]:
    """Run every stage and return one row per item; raise TransientError to retry the job."""
    settings = ctx.settings
    states = [ItemState(item) for item in job.items]
    for state in states:
        try:
            state.location = allowed_location(state.item.uri, settings)
        except ImageError as exc:
            state.error = exc
    if job.model != ctx.model.name:
        mismatch = ModelMismatch(
            f"job asks for model {job.model!r}; this worker serves {ctx.model.name!r}: "
            "run a worker with that CAPTIONER_MODEL, or enqueue with this one"
        )
        for state in states:
            state.error = state.error or mismatch

    earlier = None
    if settings.content_dedupe:
        earlier = lambda digests: ctx.results.earlier_captions(  # noqa: E731
            digests, job.model, job.prompt
        )
    caption_stream(
        [s for s in states if s.alive],
        job.prompt,
        ctx.model,
        ctx.stages,
        ctx.model_turn,
        lookahead=max(2 * ctx.model.batch_size, settings.fetch_concurrency),
        earlier=earlier,
    )
    finished = utcnow()
    return [_row(state, job, ctx.name, finished) for state in states]


def _row(state: ItemState, job: CaptionJob, worker: str, finished: datetime) -> CaptionRow:
    location = state.location
    status: Status = "ok" if state.alive and state.caption is not None else "failed"
    return CaptionRow(
        uri=state.item.uri,
        bucket=location.bucket if location else "",
        key=location.key if location else "",
        etag=state.etag if state.etag is not None else (state.item.etag or ""),
        version_id=state.version_id or state.item.version_id,
        model=job.model,
        prompt=job.prompt,
        status=status,
        caption=state.caption if status == "ok" else None,
        error=None if status == "ok" else describe(state.error),
        width=state.width,
        height=state.height,
        bytes=state.nbytes,
        enqueued_at=datetime.fromtimestamp(job.enqueued_at, UTC),
        finished_at=finished,
        worker=worker,
        content_digest=state.digest,
    )


def describe(error: BaseException | None) -> str:
    if error is None:
        return "no caption was produced"
    return f"{type(error).__name__}: {error}"


def _queue_of(task: Task) -> str:
    delivery = task.request.delivery_info or {}
    return str(delivery.get("routing_key") or "unknown")


@app.task(name=TASK_NAME, bind=True, base=GuardedTask, max_retries=MAX_JOB_RETRIES)
def caption_batch(self: Task, payload: object) -> dict[str, int]:
    queue = _queue_of(self)
    settings = get_settings()
    try:
        job = CaptionJob.from_message(payload)
    except InvalidJob as exc:
        log.warning("invalid job from %s moved to dead letters: %s", queue, exc)
        DeadLetters(settings.broker_url).push(payload, reason=str(exc), queue=queue)
        metrics.JOBS.labels("invalid", queue).inc()
        return {"ok": 0, "failed": 0}
    try:
        ctx = get_context(settings)
        rows = process_job(job, ctx)
        with metrics.STAGE_SECONDS.labels("write").time():
            ctx.writer.write(rows)
    except Exception as exc:  # any failure is retried, then dead-lettered, never acked as done
        if self.request.retries >= MAX_JOB_RETRIES:
            DeadLetters(settings.broker_url).push(payload, reason=describe(exc), queue=queue)
            metrics.JOBS.labels("dead", queue).inc()
            log.error("job sent to dead letters after %d retries: %s", self.request.retries, exc)
            return {"ok": 0, "failed": 0}
        metrics.JOBS.labels("retried", queue).inc()
        countdown = backoff_seconds(
            self.request.retries, base=2.0, cap=settings.retry_backoff_max_s
        )
        log.warning("job failed (%s), retrying in %.1fs", describe(exc), countdown,
                    exc_info=not isinstance(exc, TransientError))
        raise self.retry(exc=exc, countdown=countdown) from exc
    _record(rows, job, queue)
    return {
        "ok": sum(row.status == "ok" for row in rows),
        "failed": sum(row.status == "failed" for row in rows),
    }


def _record(rows: Sequence[CaptionRow], job: CaptionJob, queue: str) -> None:
    waited = max(0.0, utcnow().timestamp() - job.enqueued_at)
    for row in rows:
        metrics.IMAGES.labels(row.status, queue).inc()
        metrics.END_TO_END_SECONDS.labels(queue).observe(waited)
        if row.status == "failed" and row.error:
            metrics.IMAGE_ERRORS.labels(row.error.split(":", 1)[0]).inc()
    metrics.JOBS.labels("done", queue).inc()
