"""Celery's Redis transport, hardened against what anyone who can write to Redis can push.

kombu decodes each popped queue entry as a JSON envelope inside its event loop; an entry that
is not one (a stray LPUSH, a truncated write) raises there and stops the whole worker
("Unrecoverable error"), dropping the job in hand until the visibility timeout. Here such an
entry is logged and discarded, and the worker goes on. Envelopes that decode but carry a bad
body (pickle, YAML, garbage) are already refused by Celery (`accept_content=["json"]`).

It also records which worker holds each reserved message (captioning/heartbeats.py), so the
job of a worker that vanishes goes back to its queue within a heartbeat TTL, not a
visibility timeout.

`_brpop_read` and the QoS hooks are private to kombu, which is why pyproject.toml pins kombu
to one minor.
"""

from __future__ import annotations

import logging
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis

from captioning.heartbeats import worker_id
from captioning.keys import held_key

log = logging.getLogger(__name__)

#: What a non-envelope raises while being decoded and delivered.
NOT_AN_ENVELOPE = (ValueError, KeyError, TypeError, AttributeError, IndexError)


class QoS(kombu_redis.QoS):
    """kombu's ack emulation, plus this worker's `held` set of the tags it has reserved.

    The tag joins the set before the message enters `unacked`, so there is no moment when
    this worker holds a message its heartbeat does not cover.
    """

    def append(self, message: Any, delivery_tag: str) -> None:
        with self.channel.conn_or_acquire() as client:
            client.sadd(held_key(worker_id()), delivery_tag)
        super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        super().ack(delivery_tag)
        self._release(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        super().reject(delivery_tag, requeue=requeue)
        self._release(delivery_tag)

    def _release(self, delivery_tag: str) -> None:
        with self.channel.conn_or_acquire() as client:
            client.srem(held_key(worker_id()), delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except NOT_AN_ENVELOPE as exc:
            log.error("discarded a queue entry that is not a Celery message: %s: %s",
                      type(exc).__name__, str(exc)[:200])
            raise Empty() from exc


class Transport(kombu_redis.Transport):
    Channel = Channel
