"""The one way to open a Redis client on the broker (arq's `connections.py` habit).

Every client gets timeouts, so a vanished broker is an error and not a hang, TCP keepalive,
and an explicit retry policy rather than redis-py's default (which changed in redis-py 6).
Callers that can wait (dead letters, delivery counts, checkpoints, dedupe) ride out a short
Redis restart; probes, scrapes and heartbeats have their own deadline or their own loop and
fail fast with `retries=0`; a command a person waits on (`status`, `dead`) gives up on a
Redis that accepts connections and never answers within about 10 s.

No `health_check_interval`: its PING runs inside the command's own retry loop and retries
as well, so a silent Redis cost (retries + 1)^2 socket timeouts, six minutes a command.
A dead idle connection is found by the command that uses it and retried like any other.
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

#: With the default 5 retries a call waits ~5 s of backoff (0.2 s doubling, capped at 2 s)
#: on top of the connect timeouts: long enough for a Redis restart.
DEFAULT_RETRIES = 5
DEFAULT_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
COMMAND_RETRIES = 1
COMMAND_TIMEOUT_S = 4.0


def redis_client(
    broker_url: str, *, retries: int = DEFAULT_RETRIES, timeout_s: float = DEFAULT_TIMEOUT_S
) -> redis.Redis:
    """A client on `broker_url` (TLS options come from its query, as for Celery)."""
    return redis.Redis.from_url(
        broker_url,
        socket_timeout=timeout_s,
        socket_connect_timeout=min(CONNECT_TIMEOUT_S, timeout_s),
        socket_keepalive=True,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.2), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def command_client(broker_url: str) -> redis.Redis:
    """For a command a person waits on: one retry, short timeouts."""
    return redis_client(broker_url, retries=COMMAND_RETRIES, timeout_s=COMMAND_TIMEOUT_S)
