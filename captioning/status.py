"""`captioner status`: one snapshot of queues, workers, throughput, backfills, and whether
Redis can lose queued jobs.

Everything is read, nothing consumed: queue lists are sampled (captioning/queues.py), workers
answer a Celery broadcast ping, throughput comes from the results table's `finished_at`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import timedelta

from captioning.broker import create_app
from captioning.checkpoints import Checkpoint, Checkpoints
from captioning.connections import command_client
from captioning.durability import read_durability
from captioning.keys import UNACKED_KEY
from captioning.messages import WAITING_QUEUES
from captioning.queues import QueueStats, queue_stats_for
from captioning.results import PENDING, ResultsStore, utcnow
from captioning.settings import Settings

PING_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Throughput:
    window_s: int
    ok: int
    failed: int

    @property
    def per_second(self) -> float:
        return (self.ok + self.failed) / self.window_s


@dataclass(frozen=True)
class StatusReport:
    queues: dict[str, QueueStats]
    jobs_in_flight: int
    workers: list[str]
    totals: dict[str, int]
    recent: Throughput
    backfills: list[Checkpoint]
    #: What makes this Redis able to lose queued jobs (eviction, no persistence).
    broker_warnings: list[str]

    def to_json(self) -> dict[str, object]:
        return {
            "queues": {name: asdict(stats) for name, stats in self.queues.items()},
            "jobs_in_flight": self.jobs_in_flight,
            "workers": self.workers,
            "results": {
                "ok": self.totals.get("ok", 0),
                "failed": self.totals.get("failed", 0),
                "pending": self.totals.get(PENDING, 0),
                "window_s": self.recent.window_s,
                "recent_ok": self.recent.ok,
                "recent_failed": self.recent.failed,
                "per_second": round(self.recent.per_second, 3),
            },
            "backfills": [asdict(checkpoint) for checkpoint in self.backfills],
            "broker_warnings": self.broker_warnings,
        }


def collect_status(settings: Settings, *, window_s: int) -> StatusReport:
    client = command_client(settings.broker_url)
    results = ResultsStore(settings.database_url)
    try:
        recent = results.finished_since(utcnow() - timedelta(seconds=window_s))
        return StatusReport(
            queues={queue: queue_stats_for(client, queue) for queue in WAITING_QUEUES},
            jobs_in_flight=int(client.hlen(UNACKED_KEY)),
            workers=online_workers(settings),
            totals=results.status_counts(),
            recent=Throughput(window_s, recent.get("ok", 0), recent.get("failed", 0)),
            backfills=Checkpoints(client).all(),
            broker_warnings=read_durability(client).warnings(),
        )
    finally:
        client.close()
        results.dispose()


def online_workers(settings: Settings) -> list[str]:
    """Workers answering a broadcast ping within a second (busy ones answer too: the main
    process handles remote control while the pool runs the job)."""
    replies = create_app(settings).control.inspect(timeout=PING_TIMEOUT_S).ping() or {}
    return sorted(replies)


def format_status(report: StatusReport) -> str:
    lines = [f"warning: {warning}" for warning in report.broker_warnings]
    lines.append(f"{'queue':<20} {'jobs':>8} {'images':>9} {'oldest (s)':>11}")
    for name, stats in report.queues.items():
        lines.append(f"{name:<20} {stats.jobs:>8} {stats.images:>9} {stats.oldest_age_s:>11.1f}")
    lines.append(f"jobs in flight: {report.jobs_in_flight}")
    names = ", ".join(report.workers) if report.workers else "none answered"
    lines.append(f"workers online: {len(report.workers)} ({names})")
    recent = report.recent
    lines.append(
        f"rows: {report.totals.get('ok', 0)} ok, {report.totals.get('failed', 0)} failed, "
        f"{report.totals.get(PENDING, 0)} pending uploads; "
        f"last {recent.window_s // 60} min: {recent.ok} ok, {recent.failed} failed, "
        f"{recent.per_second:.1f} images/s"
    )
    if report.backfills:
        lines.append("backfills:")
    for cp in report.backfills:
        state = "finished" if cp.finished else f"at {cp.last_key!r}"
        age = time.time() - cp.updated_at
        lines.append(
            f"  {cp.name}: {state}; listed {cp.listed}, enqueued {cp.enqueued}, "
            f"skipped {cp.skipped}; updated {age:.0f} s ago"
        )
    return "\n".join(lines)
