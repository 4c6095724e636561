"""Every Redis key captioner reads or writes, named once (arq's `constants.py` habit).

They all live in the broker's database, next to Celery's queue lists (`captions.realtime`,
`captions.bulk`), which `captioning/messages.py` names with the job they carry. A key made
per thing (a host, a task, an event) is built by a function here, so no caller formats one.
"""

from __future__ import annotations

#: kombu's hash of messages reserved by workers and not yet acked. Passed to the transport
#: as `unacked_key` (captioning/broker.py), so the exporter and `status` read the hash kombu
#: writes.
UNACKED_KEY = "unacked"

#: kombu's zset of reserved messages scored by delivery time; its sweep restores those older
#: than the visibility timeout. Passed to the transport as `unacked_index_key`; the heartbeat
#: reaper sets a vanished worker's entries to 0 (captioning/heartbeats.py).
UNACKED_INDEX_KEY = "unacked_index"

#: Zset of consuming worker processes, scored by their last heartbeat (Redis server time).
HEARTBEATS_KEY = "captioner:heartbeats"

#: A list nobody writes: an idle worker blocks on it (BLPOP with a timeout) between two
#: fetches when a full Redis refused its wait on its first queue (captioning/transport.py).
FETCH_IDLE_KEY = "captioner:fetch:idle"

#: Lock (SET NX PX) held by the one process sweeping pending uploads (captioning/reconcile.py).
RECONCILER_LOCK_KEY = "captioner:reconciler"

#: Jobs that kept failing: a plain list, not a Celery queue, so no worker consumes it.
DEAD_QUEUE = "captions.dead"

#: Hash of backfill checkpoints, one field per backfill name (captioning/checkpoints.py).
BACKFILLS_KEY = "captioner:backfills"

#: Prefixes of the per-thing keys below.
HEALTH_PREFIX = "captioner:health:"
SEEN_PREFIX = "captioner:seen:"
DELIVERIES_PREFIX = "captioner:deliveries:"
DONE_PREFIX = "captioner:done:"
HELD_PREFIX = "captioner:held:"


def health_key(host: str) -> str:
    """A worker host's health record, refreshed by the worker, read by `captioner health`."""
    return HEALTH_PREFIX + host


def seen_key(event_digest: str) -> str:
    """An upload event already turned into a job (producer/dedupe.py)."""
    return SEEN_PREFIX + event_digest


def deliveries_key(task_id: str) -> str:
    """How many deliveries of a job started and did not finish (workers/delivery.py)."""
    return DELIVERIES_PREFIX + task_id


def done_key(task_id: str) -> str:
    """Set once a job's rows are written, so a redelivery is acked without running again."""
    return DONE_PREFIX + task_id


def held_key(worker_id: str) -> str:
    """Delivery tags a worker process holds unacked, for the heartbeat reaper."""
    return HELD_PREFIX + worker_id
