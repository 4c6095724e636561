"""`captioning.caption_batch`: one CaptionJob, top to bottom.

check URIs -> route the job's kinds (workers/routing.py) -> fetch + decode once (threads, a
window ahead of the models) -> each kind's model (micro-batches, in order, one job on the
models at a time) -> rows -> forward the kinds served elsewhere. Every item ends as exactly
one row per kind run or refused here: an image's own problem becomes a `failed` row, while
infrastructure failures raise TransientError
so the whole job is retried; rows are written before the task returns, and Celery acks only
then (acks_late). Delivery counting, poison isolation and the redelivery skip wrap this task
(workers/delivery.py). Under the threads pool a worker holds `jobs_in_flight` jobs sharing
one model, so one job's fetch, decode and write overlap another's generation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from celery import Task

from captioning import metrics
from captioning.broker import send_job
from captioning.connections import redis_client
from captioning.deadletters import DeadLetters
from captioning.errors import ImageError, InvalidJob, TransientError
from captioning.kinds import CAPTION, row_prompts, with_foundations
from captioning.messages import TASK_NAME, CaptionJob, kind_queue
from captioning.results import CaptionRow, utcnow
from captioning.settings import get_settings
from captioning.uris import allowed_location
from workers.app import app
from workers.context import WorkerContext, get_context
from workers.delivery import GuardedTask
from workers.pipeline import EarlierResults, ItemState, annotate_stream
from workers.retry import backoff_seconds
from workers.routing import plan

log = logging.getLogger(__name__)

MAX_JOB_RETRIES = get_settings().max_job_retries


@dataclass(frozen=True)
class Outcome:
    """A job's rows (one per item and kind it ran or refused here) and the one-kind jobs to
    forward for the kinds another worker serves."""

    rows: list[CaptionRow]
    forward: list[tuple[str, CaptionJob]]


def process_job(job: CaptionJob, ctx: WorkerContext, queue: str) -> Outcome:
    """Run every stage and return the outcome; raise TransientError to retry the job."""
    settings = ctx.settings
    states = [ItemState(item) for item in job.items]
    for state in states:
        try:
            state.location = allowed_location(state.item.uri, settings)
        except ImageError as exc:
            state.error = exc
    served = {kind: runtime.name for kind, runtime in ctx.runtimes.items()}
    routes = plan(job.annotators, served, queue=queue)
    # What the job asks for, and first the kinds those build on (their rows are not written
    # unless asked for); the worker loaded them all (workers/runtimes/registry.py).
    runtimes = {kind: ctx.runtimes[kind] for kind in with_foundations(routes.run)}
    prompts = job.all_prompts
    annotate_stream(
        [s for s in states if s.alive] if runtimes else [],
        model_prompts(routes.run, prompts),
        runtimes,
        ctx.stages,
        ctx.model_turn,
        lookahead=max(
            max((2 * runtime.batch_size for runtime in runtimes.values()), default=0),
            settings.fetch_concurrency,
        ),
        earlier=dedupe_lookups(ctx, routes.run, prompts),
    )
    finished = utcnow()
    rows = [
        _row(state, kind, model, prompt, index, job=job, worker=ctx.name, finished=finished)
        for state in states
        for kind, model in routes.run.items()
        for index, prompt in enumerate(row_prompts(kind, prompts))
    ] + [
        _row(state, kind, model, prompt, index, job=job, worker=ctx.name, finished=finished,
             refused=error)
        for state in states
        for kind, (model, error) in routes.refuse.items()
        for index, prompt in enumerate(row_prompts(kind, prompts))
    ]
    forward = [
        (kind_queue(kind), CaptionJob.create(
            items=job.items, annotators={kind: model}, prompts=prompts, source=job.source,
            enqueued_at=job.enqueued_at,
        ))
        for kind, model in routes.forward.items()
    ]
    return Outcome(rows=rows, forward=forward)


def model_prompts(asked: Mapping[str, str], prompts: Sequence[str]) -> Sequence[str]:
    """The prompts the models run: every one when the job asks for captions; only the first
    when the caption kind runs only for the kinds built on it (interrogate reads one)."""
    return prompts if CAPTION.name in asked else prompts[:1]


def dedupe_lookups(
    ctx: WorkerContext, models: Mapping[str, str], prompts: Sequence[str]
) -> dict[str, EarlierResults]:
    """With CAPTIONER_CONTENT_DEDUPE, the caption kind of a one-prompt job looks up earlier
    captions of the same bytes for its model and prompt. Other kinds (tags) and jobs of
    several prompts always run: only one text is copied."""
    if not ctx.settings.content_dedupe or CAPTION.name not in models or len(prompts) != 1:
        return {}
    model, row_text_prompt = models[CAPTION.name], row_prompts(CAPTION.name, prompts)[0]
    return {CAPTION.name: lambda digests: ctx.results.earlier_captions(
        digests, model, row_text_prompt, ctx.settings.scorer
    )}


def _row(
    state: ItemState,
    kind: str,
    model: str,
    prompt: str,
    prompt_index: int,
    *,
    job: CaptionJob,
    worker: str,
    finished: datetime,
    refused: ImageError | None = None,
) -> CaptionRow:
    """The row of one item for one kind and prompt: its result (with scores when a scorer
    ran), or `failed` with the item's own error (or why this worker refused the kind)."""
    results = [] if refused is not None else state.results.get(kind, [])
    result = results[prompt_index] if prompt_index < len(results) else None
    ok = result if state.alive else None
    location = state.location
    return CaptionRow(
        uri=state.item.uri,
        bucket=location.bucket if location else "",
        key=location.key if location else "",
        etag=state.etag if state.etag is not None else (state.item.etag or ""),
        version_id=state.version_id or state.item.version_id,
        model=model,
        prompt=prompt,
        status="ok" if ok else "failed",
        caption=ok.text if ok else None,
        error=None if ok else describe(state.error or refused),
        width=state.width,
        height=state.height,
        bytes=state.nbytes,
        enqueued_at=datetime.fromtimestamp(job.enqueued_at, UTC),
        finished_at=finished,
        worker=worker,
        content_digest=state.digest,
        kind=kind,
        tags=ok.tags if ok else None,
        match_probability=ok.match_probability if ok else None,
        itc_cosine=ok.itc_cosine if ok else None,
        scorer=ok.scorer if ok else None,
        candidates=[asdict(c) for c in ok.candidates] if ok and ok.candidates else None,
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
        DeadLetters(redis_client(settings.broker_url)).push(payload, reason=str(exc), queue=queue)
        metrics.JOBS.labels("invalid", queue).inc()
        return {"ok": 0, "failed": 0}
    try:
        ctx = get_context(settings)
        outcome = process_job(job, ctx, queue)
        with metrics.STAGE_SECONDS.labels("write", metrics.SHARED).time():
            ctx.writer.write(outcome.rows, main_prompt=job.all_prompts[0])
        with self.app.producer_or_acquire() as producer:
            for kind_queue_name, forwarded in outcome.forward:
                send_job(self.app, forwarded, kind_queue_name, producer=producer)
    except Exception as exc:  # any failure is retried, then dead-lettered, never acked as done
        if self.request.retries >= MAX_JOB_RETRIES:
            DeadLetters(redis_client(settings.broker_url)).push(
                payload, reason=describe(exc), queue=queue
            )
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
    rows = outcome.rows
    _record(rows, job, queue)
    if outcome.forward:
        log.info("forwarded to %s", ", ".join(name for name, _ in outcome.forward))
    return {
        "ok": sum(row.status == "ok" for row in rows),
        "failed": sum(row.status == "failed" for row in rows),
        "forwarded": len(outcome.forward),
    }


def _record(rows: Sequence[CaptionRow], job: CaptionJob, queue: str) -> None:
    waited = max(0.0, utcnow().timestamp() - job.enqueued_at)
    for row in rows:
        kind = row.kind or CAPTION.name
        metrics.IMAGES.labels(row.status, queue, kind).inc()
        if row.match_probability is not None:
            metrics.MATCH_PROBABILITY.labels(row.model, row.scorer or "").observe(
                row.match_probability
            )
        metrics.END_TO_END_SECONDS.labels(queue, kind).observe(waited)
        if row.status == "failed" and row.error:
            metrics.IMAGE_ERRORS.labels(row.error.split(":", 1)[0], kind).inc()
    metrics.JOBS.labels("done", queue).inc()
