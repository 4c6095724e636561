"""Dead letters: jobs that kept failing, kept in a plain Redis list for people to inspect.

`captions.dead` is not a Celery queue, so no worker consumes it by accident; replaying a
job is an explicit `captioner dead requeue`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from captioning.broker import redis_client
from captioning.messages import DEAD_QUEUE


@dataclass(frozen=True)
class DeadLetter:
    payload: Any
    reason: str
    queue: str
    failed_at: float


class DeadLetters:
    def __init__(self, broker_url: str) -> None:
        self._redis = redis_client(broker_url)

    def push(self, payload: object, *, reason: str, queue: str) -> None:
        record = {"payload": payload, "reason": reason, "queue": queue, "failed_at": time.time()}
        self._redis.lpush(DEAD_QUEUE, json.dumps(record, default=str))

    def list(self, limit: int = 100) -> list[DeadLetter]:
        raw = self._redis.lrange(DEAD_QUEUE, -limit, -1)
        return [DeadLetter(**json.loads(item)) for item in reversed(raw)]

    def pop_oldest(self) -> DeadLetter | None:
        raw = self._redis.rpop(DEAD_QUEUE)
        return DeadLetter(**json.loads(raw)) if raw else None

    def purge(self) -> int:
        count = int(self._redis.llen(DEAD_QUEUE))
        self._redis.delete(DEAD_QUEUE)
        return count

    def __len__(self) -> int:
        return int(self._redis.llen(DEAD_QUEUE))
