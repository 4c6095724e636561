"""Worker heartbeats, and the requeue of jobs held by a worker whose heartbeat stopped.

kombu keeps every reserved message in the `unacked` hash (and its delivery time in the
`unacked_index` zset) until it is acked, and hands it out again only after the visibility
timeout: about 20 minutes with the default settings, sized so that no live job is ever
taken away. That is too long to wait for the job of a worker that is simply gone.

So, like dramatiq's Redis broker (a heartbeat zset, per-worker ack sets, dead workers'
messages moved back by the fetch script) and Sidekiq's super_fetch (a private list per
process, orphans pushed back once the process's heartbeat key has expired):

- each consuming worker process adds the delivery tag of a job to its own `held` set in the
  same Lua script that takes the job off its queue (captioning/fetch.py), and removes it
  when it acks or rejects (captioning/transport.py);
- a thread in that process writes its id into the `heartbeats` zset every TTL/4 seconds,
  scored by Redis's own clock (no skew between hosts); it is a thread of the main worker
  process, which a long `generate()` in the pool never blocks;
- after each beat the same thread runs one Lua script: every worker whose last beat is
  older than the TTL loses its entry, and the tags in its `held` set get an `unacked_index`
  score of 0, i.e. their visibility timeout is over. kombu's own sweep (every few seconds,
  in every worker) then restores them to their queues, in one transaction per message, so
  each goes back once. The script runs atomically, so two reapers never claim twice.

A worker that is slow but alive keeps beating and keeps its jobs. One stalled past the TTL
(a partition, a stop) loses them to another worker; if it finishes anyway, its rows are
upserts (one row per image, `attempts` 2). The visibility timeout stays as the last resort
(a held set lost with Redis's data, say).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass

import redis

from captioning.keys import HEARTBEATS_KEY, HELD_PREFIX, UNACKED_INDEX_KEY, held_key

log = logging.getLogger(__name__)

_BEAT = """
local now = redis.call('TIME')[1]
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return now
"""

#: Hands a worker's held tags to kombu's sweep and forgets the worker; returns the tags
#: still reserved (those acked meanwhile are no longer in the index).
_RELEASE = """
local function release(heartbeats, index, held_prefix, id)
  local held = held_prefix .. id
  local claimed = 0
  for _, tag in ipairs(redis.call('SMEMBERS', held)) do
    claimed = claimed + redis.call('ZADD', index, 'XX', 'CH', 0, tag)
  end
  redis.call('DEL', held)
  redis.call('ZREM', heartbeats, id)
  return claimed
end
"""

_REAP = _RELEASE + """
local now = tonumber(redis.call('TIME')[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[1])))
local claimed = 0
for _, id in ipairs(dead) do
  claimed = claimed + release(KEYS[1], KEYS[2], ARGV[2], id)
end
return {#dead, claimed}
"""

_LEAVE = _RELEASE + """
return release(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
"""

_worker_id: tuple[int, str] | None = None


def worker_id() -> str:
    """This process's id in the heartbeats zset: host, pid and a nonce (pids are reused)."""
    global _worker_id  # noqa: PLW0603 - one id per process, recomputed after a fork
    if _worker_id is None or _worker_id[0] != os.getpid():
        _worker_id = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    return _worker_id[1]


def beat_interval_s(ttl_s: float) -> float:
    return max(0.5, ttl_s / 4)


@dataclass(frozen=True)
class Reaped:
    workers: int
    jobs: int


class Heartbeat:
    """Beats for this process and requeues the jobs of workers that stopped beating."""

    def __init__(self, client: redis.Redis, *, ttl_s: int, held_ttl_s: int) -> None:
        self._client = client
        self._ttl_s = ttl_s
        # A held set outlives any delivery in it; the beat keeps it alive while we run.
        self._held_ttl_s = held_ttl_s
        self._id = worker_id()
        self._beat = client.register_script(_BEAT)
        self._reap = client.register_script(_REAP)
        self._leave = client.register_script(_LEAVE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    @property
    def id(self) -> str:
        return self._id

    def start(self) -> None:
        self._thread.start()

    def beat(self) -> None:
        self._beat(keys=[HEARTBEATS_KEY, held_key(self._id)], args=[self._id, self._held_ttl_s])

    def reap(self) -> Reaped:
        workers, jobs = self._reap(
            keys=[HEARTBEATS_KEY, UNACKED_INDEX_KEY], args=[self._ttl_s, HELD_PREFIX]
        )
        return Reaped(int(workers), int(jobs))

    def stop(self) -> Reaped:
        """Leave the zset, releasing what this worker still holds.

        kombu restores the jobs it delivered at shutdown; what is left is a job fetched whose
        reply was never read, which other workers' sweeps then restore at once.
        """
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            jobs = self._leave(keys=[HEARTBEATS_KEY, UNACKED_INDEX_KEY],
                               args=[HELD_PREFIX, self._id])
        except redis.RedisError as exc:
            log.warning("cannot remove this worker's heartbeat (%s); it expires by itself", exc)
            return Reaped(0, 0)
        return Reaped(1, int(jobs))

    def _run(self) -> None:
        while True:
            try:
                self.beat()
                reaped = self.reap()
            except redis.RedisError as exc:
                # Shorter than the TTL, a blip costs nothing: the next beat is in time.
                log.warning("heartbeat failed (%s); retrying", type(exc).__name__)
            else:
                if reaped.workers:
                    log.warning(
                        "%d worker(s) stopped beating for %d s: %d job(s) they held go back "
                        "to their queues", reaped.workers, self._ttl_s, reaped.jobs,
                    )
            if self._stop.wait(beat_interval_s(self._ttl_s)):
                return
