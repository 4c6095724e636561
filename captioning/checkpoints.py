"""Backfill checkpoints: how far each named backfill has listed, kept in the broker's Redis.

Written by `captioner backfill` after every job it sends, read by `backfill --resume` and by
`captioner status`. They live in the same Redis database as the queues on purpose: a
checkpoint promises "everything up to this key is queued or done", and that promise is
only true while the queued jobs exist. If Redis is flushed or lost, jobs and checkpoints go
together, and a fresh backfill (skip-existing on) re-lists and queues exactly what has no
row. A checkpoint kept in the results database would outlive the jobs it vouches for and
make `--resume` skip images that were never captioned.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import redis

from captioning.keys import BACKFILLS_KEY


@dataclass
class Checkpoint:
    name: str
    source: str
    last_key: str = ""
    listed: int = 0
    images: int = 0
    skipped: int = 0
    enqueued: int = 0
    jobs: int = 0
    finished: bool = False
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


class Checkpoints:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def get(self, name: str) -> Checkpoint | None:
        raw = self._redis.hget(BACKFILLS_KEY, name)
        return Checkpoint(**json.loads(raw)) if raw else None

    def save(self, checkpoint: Checkpoint) -> None:
        checkpoint.updated_at = time.time()
        self._redis.hset(BACKFILLS_KEY, checkpoint.name, json.dumps(asdict(checkpoint)))

    def all(self) -> list[Checkpoint]:
        raw = self._redis.hgetall(BACKFILLS_KEY)
        return sorted(
            (Checkpoint(**json.loads(value)) for value in raw.values()),
            key=lambda checkpoint: checkpoint.updated_at,
            reverse=True,
        )
