"""Reading the work waiting in Redis without consuming it: depth, images, oldest age.

Celery on Redis keeps each queue as a list (LPUSH, BRPOP: the oldest message is at the
right end) and reserved-but-unacked messages in the `unacked` hash. Images per queue are
counted exactly over a sample of messages from both ends and scaled to the list length, so
a scrape costs the same for ten jobs as for a million.

The envelope and unacked-entry layouts read here are kombu's private format, which is why
pyproject.toml pins kombu to one minor version.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass

import redis

from captioning.keys import UNACKED_KEY

SAMPLE_MESSAGES = 50


@dataclass(frozen=True)
class QueueStats:
    jobs: int
    images: int
    oldest_age_s: float


def job_of(raw: bytes | str) -> dict[str, object] | None:
    """The CaptionJob dict inside a raw kombu message, or None if it is not one of ours."""
    try:
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        job = args[0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return job if isinstance(job, dict) else None


def images_in(job: dict[str, object] | None) -> int:
    """Images in a job of either wire form: `items` (original) or `keys` (compact)."""
    items = (job.get("keys") or job.get("items")) if job else None
    return len(items) if isinstance(items, list) else 0


def queue_stats_for(client: redis.Redis, queue: str, now: float | None = None) -> QueueStats:
    jobs = int(client.llen(queue))
    if jobs == 0:
        return QueueStats(jobs=0, images=0, oldest_age_s=0.0)
    half = SAMPLE_MESSAGES // 2
    sample = client.lrange(queue, -half, -1)
    if jobs > half:
        sample += client.lrange(queue, 0, min(half, jobs - half) - 1)
    parsed = [job_of(raw) for raw in sample]
    sampled_images = sum(images_in(job) for job in parsed)
    images = round(sampled_images * jobs / len(sample)) if sample else 0
    oldest = parsed[-1] if parsed else None
    enqueued_at = oldest.get("enqueued_at") if oldest else None
    age = (now or time.time()) - float(enqueued_at) if isinstance(enqueued_at, int | float) else 0.0
    return QueueStats(jobs=jobs, images=images, oldest_age_s=max(0.0, age))


@dataclass(frozen=True)
class InFlight:
    jobs: int
    images: int


def inflight_stats(client: redis.Redis) -> InFlight:
    """Jobs reserved by workers but not acked: kombu keeps them in the UNACKED_KEY hash.

    Few (one per worker process with prefetch 1), so every one is read.
    """
    values = client.hvals(UNACKED_KEY)
    images = 0
    for raw in values:
        try:
            message = json.loads(raw)[0]
        except (ValueError, IndexError, TypeError):
            continue
        images += images_in(job_of(json.dumps(message)))
    return InFlight(jobs=len(values), images=images)
