"""Dead letters: jobs that kept failing, kept in a plain Redis list for people to inspect.

`captions.dead` is not a Celery queue, so no worker consumes it by accident; replaying a
job is an explicit `captioner dead requeue`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from captioning.keys import DEAD_QUEUE


@dataclass(frozen=True)
class DeadLetter:
    payload: Any
    reason: str
    queue: str
    failed_at: float


class DeadLetters:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def push(self, payload: object, *, reason: str, queue: str) -> None:
        record = {"payload": payload, "reason": reason, "queue": queue, "failed_at": time.time()}
        self._redis.lpush(DEAD_QUEUE, json.dumps(record, default=str))

    def list(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest `limit` letters, oldest first."""
        raw = self._redis.lrange(DEAD_QUEUE, -limit, -1)
        return [parse_letter(item) for item in reversed(raw)]

    def requeue(self, send: Callable[[DeadLetter], bool]) -> tuple[int, int]:
        """Offer every letter, oldest first, to `send`; a letter leaves the list only once
        `send` says it was sent, so a crash or a refused letter never loses one.

        Returns (sent, kept).
        """
        sent = kept = 0
        for raw in reversed(self._redis.lrange(DEAD_QUEUE, 0, -1)):
            if send(parse_letter(raw)):
                self._redis.lrem(DEAD_QUEUE, -1, raw)
                sent += 1
            else:
                kept += 1
        return sent, kept

    def purge(self) -> int:
        count = int(self._redis.llen(DEAD_QUEUE))
        self._redis.delete(DEAD_QUEUE)
        return count

    def __len__(self) -> int:
        return int(self._redis.llen(DEAD_QUEUE))


def parse_letter(raw: bytes | str) -> DeadLetter:
    """A stored letter; anything unreadable (written by hand, say) is shown, not fatal."""
    try:
        return DeadLetter(**json.loads(raw))
    except (ValueError, TypeError):
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        return DeadLetter(payload=text, reason="unreadable dead letter", queue="", failed_at=0)
