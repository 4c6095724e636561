"""Backpressure for backfills: a queue-depth gate and a rate limit.

The gate keeps Redis memory bounded whatever the bucket size: listing pauses while the bulk
queue holds more than `max_images` images, and resumes as workers drain it. The rate limit
is for sharing a store's request budget or a downstream quota.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

POLL_S = 0.5


class QueueGate:
    """Blocks a send while the queue would hold more than `max_images` images.

    Redis is asked only when our own count of what we sent since the last look says the cap
    may be reached, so a backfill far below the cap pays no extra round trip per job. Depth
    is `LLEN * images_per_job`: our jobs are full batches (but for the last), and smaller
    jobs from other producers make it err on the safe side (pausing early).
    """

    def __init__(
        self,
        client: redis.Redis,
        queue: str,
        *,
        max_images: int,
        images_per_job: int,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._redis = client
        self._queue = queue
        self._max_images = max_images
        self._images_per_job = images_per_job
        self._sleep = sleep
        self._estimate = max_images  # unknown: look at the first send
        self.paused_s = 0.0
        self._lock = threading.Lock()  # parallel listing shares one gate

    def depth(self) -> int:
        return int(self._redis.llen(self._queue)) * self._images_per_job

    def wait(self, images: int) -> None:
        """Return once `images` more fit under the cap (always, if the queue is empty)."""
        with self._lock:
            self._wait(images)

    def _wait(self, images: int) -> None:
        self._estimate += images
        if self._estimate <= self._max_images:
            return
        depth = self.depth()
        if depth + images > self._max_images and depth > 0:
            log.info("pausing: %s holds ~%d images (max %d)", self._queue, depth, self._max_images)
            started = time.monotonic()
            while depth + images > self._max_images and depth > 0:
                self._sleep(POLL_S)
                depth = self.depth()
            waited = time.monotonic() - started
            self.paused_s += waited
            log.info("resuming after %.1f s: %s holds ~%d images", waited, self._queue, depth)
        self._estimate = depth + images


class RateLimiter:
    """At most `per_second` images per second on average, with bursts up to one second's worth."""

    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = per_second
        self._clock = clock
        self._allowance = per_second
        self._last = clock()
        self._lock = threading.Lock()  # parallel listing shares one limit

    def acquire(self, images: int) -> None:
        with self._lock:
            self._acquire(images)

    def _acquire(self, images: int) -> None:
        now = self._clock()
        self._allowance = min(self._rate, self._allowance + (now - self._last) * self._rate)
        self._last = now
        self._allowance -= images
        if self._allowance < 0:
            time.sleep(-self._allowance / self._rate)
