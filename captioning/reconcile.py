"""The reconciler: accepted uploads that have no result yet go back on the realtime queue.

Listeners write a `pending` row before they acknowledge an upload (captioning/results.py).
If Redis then loses the job (a flush, a failover without persistence, eviction), nothing
would ever bring it back: this does. It runs in every worker and in the exporter, but a
Redis lock lets only one of them sweep at a time.

A pending upload is sent again only when it is older than `PENDING_REQUEUE_AFTER_S` and the
realtime queue holds nothing enqueued before it was last sent: the queue is first in, first
out, so then its job has left the queue (run, running, or lost). A backlog therefore never
makes the reconciler pile copies of waiting uploads onto the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis
from celery import Celery

from captioning.keys import RECONCILER_LOCK_KEY
from captioning.kinds import CAPTION
from captioning.messages import REALTIME_QUEUE, TASK_NAME, CaptionJob, JobItem
from captioning.queues import queue_stats_for
from captioning.results import CaptionRow, ResultsStore, utcnow
from captioning.settings import Settings

log = logging.getLogger(__name__)

SWEEP_LIMIT = 1024
JOB_IMAGES = 32


def sweep_interval_s(requeue_after_s: int) -> float:
    return max(1.0, min(60.0, requeue_after_s / 4))


def left_the_queue(handed_at: datetime, oldest_waiting_s: float, waiting: int,
                   now: datetime) -> bool:
    """True when nothing handed to the queue at or before `handed_at` can still wait in it."""
    if handed_at.tzinfo is None:  # SQLite gives back naive UTC
        handed_at = handed_at.replace(tzinfo=UTC)
    return waiting == 0 or handed_at < now - timedelta(seconds=oldest_waiting_s)


def jobs_for(rows: Sequence[CaptionRow], size: int) -> list[CaptionJob]:
    """Pending rows as realtime jobs, one kind and model each (a row of a job asking for
    several kinds comes back alone), grouped by prompt, `size` images each."""
    groups: dict[tuple[str, str, str], list[JobItem]] = defaultdict(list)
    for row in rows:
        groups[(row.kind or CAPTION.name, row.model, row.prompt)].append(
            JobItem(uri=row.uri, etag=row.etag or None, version_id=row.version_id)
        )
    jobs = []
    for (kind, model, prompt), items in groups.items():
        for start in range(0, len(items), size):
            jobs.append(CaptionJob.create(items=tuple(items[start : start + size]),
                                          annotators={kind: model}, prompt=prompt,
                                          source="event"))
    return jobs


@dataclass(frozen=True)
class Sweep:
    requeued: int
    settled: int


class Reconciler:
    def __init__(
        self, app: Celery, client: redis.Redis, results: ResultsStore, *,
        requeue_after_s: int, owner: str,
    ) -> None:
        self._app = app
        self._redis = client
        self._results = results
        self._after = timedelta(seconds=requeue_after_s)
        self._interval_s = sweep_interval_s(requeue_after_s)
        self._owner = owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)

    @classmethod
    def start_in_fleet(
        cls, settings: Settings, app: Celery, client: redis.Redis, owner: str
    ) -> Reconciler:
        """The sweeping thread of a worker or the exporter, on this fleet's settings."""
        reconciler = cls(app, client, ResultsStore(settings.database_url),
                         requeue_after_s=settings.pending_requeue_after_s, owner=owner)
        reconciler._thread.start()
        return reconciler

    def stop(self) -> None:
        self._stop.set()

    def sweep(self) -> Sweep:
        """One pass: drop pending rows a result made moot, send the overdue ones again."""
        settled = self._results.settle_pending()
        now = utcnow()
        due = self._results.pending_before(now - self._after, SWEEP_LIMIT)
        waiting = queue_stats_for(self._redis, REALTIME_QUEUE, now=time.time())
        due = [row for row in due
               if left_the_queue(row.finished_at, waiting.oldest_age_s, waiting.jobs, now)]
        with self._app.producer_or_acquire() as producer:
            for job in jobs_for(due, JOB_IMAGES):
                self._app.send_task(
                    TASK_NAME, args=[job.to_message()], queue=REALTIME_QUEUE,
                    producer=producer, ignore_result=True,
                    argsrepr=f"<CaptionJob of {len(job.items)} pending uploads>",
                )
        if due:
            self._results.mark_requeued(due, now)
        return Sweep(requeued=len(due), settled=settled)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                if not self._redis.set(RECONCILER_LOCK_KEY, self._owner, nx=True,
                                       px=int(self._interval_s * 1000)):
                    continue  # another worker or the exporter sweeps this round
                swept = self.sweep()
            except Exception as exc:
                log.warning("reconciler sweep failed (%s: %s); retrying", type(exc).__name__, exc)
                continue
            if swept.requeued:
                log.warning("%d accepted uploads had no result after %d s: sent again to %s",
                            swept.requeued, self._after.total_seconds(), REALTIME_QUEUE)
