"""Celery's Redis transport, hardened against losing jobs and against junk in the queues.

- **Fetch.** A worker takes a job off its queue with one Lua script that first records it as
  reserved by this worker (captioning/fetch.py), in place of kombu's BRPOP, which pops and
  records later. A worker whose last fetch found nothing first waits, up to
  `FETCH_IDLE_WAIT_S`, for its first queue (captions.realtime) to have a message, without
  taking it: a job sent there to an idle worker is fetched at once, one sent to a later
  queue (bulk) within that time.
- **Held jobs.** Each reserved tag is in this worker's `held` set until it is acked or
  rejected, so the job of a worker that vanishes goes back to its queue within a heartbeat
  TTL, not a visibility timeout (captioning/heartbeats.py).
- **Requeues go to the front.** A job requeued because its pool process died (Celery rejects
  it) is older than everything waiting, so it runs next, as kombu already does for jobs it
  restores (a vanished worker's, or one past the visibility timeout); kombu would push a
  rejected one behind the whole backlog.
- **Junk.** kombu decodes each popped entry as a JSON envelope inside its event loop; an
  entry that is not one (a stray LPUSH, a truncated write) raises there and stops the whole
  worker ("Unrecoverable error"). Here it is logged and discarded, and the worker goes on.
  Envelopes that decode but carry a bad body (pickle, YAML) are refused by Celery
  (`accept_content=["json"]`).

`_brpop_start`, `_brpop_read` and the QoS hooks are private to kombu, which is why
pyproject.toml pins kombu to one minor.
"""

from __future__ import annotations

import logging
from queue import Empty
from time import monotonic, time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import loads

from captioning.fetch import fetch_args, fetch_script, parse_fetched
from captioning.heartbeats import worker_id
from captioning.keys import FETCH_IDLE_KEY, held_key

log = logging.getLogger(__name__)

#: What a non-envelope raises while being decoded and delivered.
NOT_AN_ENVELOPE = (ValueError, KeyError, TypeError, AttributeError, IndexError)

#: The longest an idle worker waits between two fetches (a message for its first queue ends
#: the wait at once).
FETCH_IDLE_WAIT_S = 0.5


class QoS(kombu_redis.QoS):
    """kombu's ack emulation, plus this worker's `held` set of the tags it has reserved."""

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.take_fetched(delivery_tag):
            # The fetch script recorded it before popping it: only kombu's memory is left.
            virtual.QoS.append(self, message, delivery_tag)
            return
        # Delivered another way (basic_get pops with RPOP): record it as kombu does.
        with self.channel.conn_or_acquire() as client:
            client.sadd(held_key(worker_id()), delivery_tag)
        super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        super().ack(delivery_tag)
        self._release(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        super().reject(delivery_tag, requeue=requeue)
        self._release(delivery_tag)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        """`leftmost` is the back of the queue (LPUSH), where kombu puts rejected jobs."""
        super().restore_by_tag(tag, client=client, leftmost=False)

    def _release(self, delivery_tag: str) -> None:
        with self.channel.conn_or_acquire() as client:
            client.srem(held_key(worker_id()), delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS
    from_transport_options = (*kombu_redis.Channel.from_transport_options, "held_ttl")
    #: Settings.held_ttl_s, passed as a transport option (captioning/broker.py).
    held_ttl = 7200

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fetched: set[str] = set()
        self._script: str | None = None
        self._idle = False
        self._waiting = False
        self._queue_wait_refused = False

    def take_fetched(self, delivery_tag: str) -> bool:
        """Whether the fetch script recorded this tag (asked once, by QoS.append)."""
        if delivery_tag in self._fetched:
            self._fetched.discard(delivery_tag)
            return True
        return False

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        self._waiting = self._idle
        if self._waiting:
            connection.send_command(*self._wait_command(keys[0]))
        connection.send_command("EVAL", self._fetch_script(), *fetch_args(
            keys, unacked_key=self.unacked_key, unacked_index_key=self.unacked_index_key,
            held_key=held_key(worker_id()), worker=worker_id(), held_ttl_s=self.held_ttl,
            now=time(),
        ))

    def _brpop_read(self, **options: Any) -> bool:
        connection = self.client.connection
        try:
            try:
                if self._waiting:
                    self._read_wait(connection, **options)
                reply = self.client.parse_response(connection, "EVAL", **options)
            except self.connection_errors:
                # Disconnect so that the next poll reconnects (as kombu does).
                connection.disconnect()
                raise
            except redis.ResponseError as exc:
                log.error("cannot take a job from Redis: %s (at maxmemory with noeviction, "
                          "give Redis more memory; see the README, Deploy)", exc)
                self._idle = True
                raise Empty() from exc
            fetched = parse_fetched(reply)
            self._idle = fetched is None
            if fetched is None:
                raise Empty()
            queue = fetched.queue_key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            return self._deliver_fetched(fetched.raw, queue, fetched.recorded)
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _wait_command(self, first_key: str) -> tuple[str | float, ...]:
        """Wait for the first queue to have a message without taking it: LMOVE from its
        right end to its right end leaves it as it was. A full Redis refuses that (it may
        write), so after a refusal the next wait is a pop of a key nobody writes."""
        if self._queue_wait_refused:
            return ("BLPOP", FETCH_IDLE_KEY, FETCH_IDLE_WAIT_S)
        return ("BLMOVE", first_key, first_key, "RIGHT", "RIGHT", FETCH_IDLE_WAIT_S)

    def _read_wait(self, connection: Any, **options: Any) -> None:
        try:
            self.client.parse_response(connection, "BLMOVE", **options)
        except redis.ResponseError:
            self._queue_wait_refused = True
        else:
            self._queue_wait_refused = False

    def _deliver_fetched(self, raw: bytes, queue: str, recorded: bool) -> bool:
        try:
            message = loads(raw)
            if recorded:
                self._fetched.add(message["properties"]["delivery_tag"])
            self.connection._deliver(message, queue)
        except NOT_AN_ENVELOPE as exc:
            log.error("discarded a queue entry that is not a Celery message: %s: %s",
                      type(exc).__name__, str(exc)[:200])
            raise Empty() from exc
        return True

    def _fetch_script(self) -> str:
        if self._script is None:
            with self.conn_or_acquire() as client:
                self._script = fetch_script(str(client.info("server")["redis_version"]))
        return self._script


class Transport(kombu_redis.Transport):
    Channel = Channel
