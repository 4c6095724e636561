"""Taking a job off its queue and recording who holds it, in one step.

kombu's Redis transport pops a message with BRPOP and records it in `unacked` only when the
consumer reads the reply. In between, the job exists only in a socket buffer, and kombu keeps
it there on purpose while the worker has no prefetch credit (it holds a retried job waiting
for its ETA, then runs it): for as long as a job runs. A worker killed then loses the job for
good, since neither the visibility timeout nor the heartbeat can restore what Redis no longer
has. The soak saw it in 2 of 7 whole-worker kills.

So a worker fetches with this script instead, as dramatiq's Redis broker does with its Lua
`fetch` and Sidekiq's super_fetch with LMOVE into a private list: for the first queue key (in
the priority order kombu would BRPOP them) that has a message, it records the message in
kombu's `unacked` hash and `unacked_index` zset and the tag in the worker's `held` set, marks
the worker alive in the heartbeats zset if it is not there yet, and only then pops it.
Whatever happens to the reply, the job is covered by the heartbeat reaper from the moment it
leaves its queue, even before the worker's first beat.

The pop comes last: a Redis at `maxmemory` with `noeviction` refuses the first write, and
the script stops before anything changed. Redis 7 runs the script with `allow-oom`, so
workers keep draining a full Redis; Redis 6 refuses the fetch until memory is freed.
"""

from __future__ import annotations

from dataclasses import dataclass

from captioning.keys import HEARTBEATS_KEY

_FETCH = """
local queues = tonumber(ARGV[1])
local unacked, index, held = KEYS[queues + 1], KEYS[queues + 2], KEYS[queues + 3]
for i = 1, queues do
  local raw = redis.call('LINDEX', KEYS[i], -1)
  if raw then
    local decoded, envelope = pcall(cjson.decode, raw)
    local properties = decoded and type(envelope) == 'table' and envelope['properties']
    local tag = type(properties) == 'table' and properties['delivery_tag']
    local info = type(properties) == 'table' and properties['delivery_info']
    local recorded = 0
    if type(tag) == 'string' and type(info) == 'table' then
      local entry = '[' .. raw .. ',' .. cjson.encode(info['exchange']) .. ','
        .. cjson.encode(info['routing_key']) .. ']'
      redis.call('HSET', unacked, tag, entry)
      redis.call('ZADD', index, ARGV[2], tag)
      redis.call('SADD', held, tag)
      redis.call('EXPIRE', held, ARGV[4])
      redis.call('ZADD', KEYS[queues + 4], 'NX', redis.call('TIME')[1], ARGV[3])
      recorded = 1
    end
    redis.call('RPOP', KEYS[i])
    return {KEYS[i], raw, recorded}
  end
end
return false
"""

#: Redis 7 reads flags from a shebang line; Redis 6 cannot compile one.
_ALLOW_OOM = "#!lua flags=allow-oom\n"


def fetch_script(redis_version: str) -> str:
    major = int(redis_version.split(".", 1)[0])
    return (_ALLOW_OOM if major >= 7 else "") + _FETCH


@dataclass(frozen=True)
class Fetched:
    queue_key: str
    raw: bytes
    #: False for an entry that is not a kombu envelope: popped, held by nobody, discarded.
    recorded: bool


def fetch_args(
    queue_keys: list[str], *, unacked_key: str, unacked_index_key: str, held_key: str,
    worker: str, held_ttl_s: int, now: float,
) -> list[str | int | float]:
    """Keys and arguments of one EVAL of the fetch script, after the script itself.

    `now` is the caller's clock, as kombu scores `unacked_index` and compares it to its own.
    """
    keys = [*queue_keys, unacked_key, unacked_index_key, held_key, HEARTBEATS_KEY]
    return [len(keys), *keys, len(queue_keys), repr(now), worker, held_ttl_s]


def parse_fetched(reply: object) -> Fetched | None:
    """The script's reply: nothing (every queue empty) or the popped message."""
    if not reply:
        return None
    queue_key, raw, recorded = reply  # type: ignore[misc]
    key = queue_key.decode() if isinstance(queue_key, bytes) else str(queue_key)
    return Fetched(key, raw if isinstance(raw, bytes) else str(raw).encode(), bool(recorded))
