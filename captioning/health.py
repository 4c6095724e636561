"""Worker health as a Redis key the worker refreshes, read by `captioner health` (arq's habit).

Kubernetes probes run `captioner health` inside the pod: the key for this host must be fresh
(liveness), and with `--ready` the model must also be loaded and warmed (readiness), so a
pod takes no traffic while it is still loading weights.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import asdict, dataclass

import redis

from captioning.connections import redis_client
from captioning.keys import health_key

REFRESH_EVERY_S = 10.0
STALE_AFTER_S = 60.0


@dataclass(frozen=True)
class WorkerHealth:
    host: str
    pid: int
    model: str
    warmed: bool
    updated_at: float


def is_healthy(health: WorkerHealth | None, *, ready: bool, now: float) -> bool:
    if health is None or now - health.updated_at > STALE_AFTER_S:
        return False
    return health.warmed or not ready


def read_health(client: redis.Redis, host: str) -> WorkerHealth | None:
    raw = client.get(health_key(host))
    return WorkerHealth(**json.loads(raw)) if raw else None


class HealthBeacon:
    """A daemon thread that rewrites this worker's health key every few seconds."""

    def __init__(self, broker_url: str, *, model: str, pid: int) -> None:
        # No retries: a missed beat is retried by the loop, 10 s later.
        self._client = redis_client(broker_url, retries=0, timeout_s=5)
        self._host = socket.gethostname()
        self._model = model
        self._pid = pid
        self.warmed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def beat(self) -> None:
        health = WorkerHealth(self._host, self._pid, self._model, self.warmed, time.time())
        self._client.set(health_key(self._host), json.dumps(asdict(health)), ex=int(STALE_AFTER_S))

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(redis.RedisError):
                self.beat()  # while the broker is down the key goes stale; the probe says so
            self._stop.wait(REFRESH_EVERY_S)
