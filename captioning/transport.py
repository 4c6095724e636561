"""Celery's Redis transport, hardened against what anyone who can write to Redis can push.

kombu decodes each popped queue entry as a JSON envelope inside its event loop; an entry that
is not one (a stray LPUSH, a truncated write) raises there and stops the whole worker
("Unrecoverable error"), dropping the job in hand until the visibility timeout. Here such an
entry is logged and discarded, and the worker goes on. Envelopes that decode but carry a bad
body (pickle, YAML, garbage) are already refused by Celery (`accept_content=["json"]`).

`_brpop_read` is private to kombu, which is why pyproject.toml pins kombu to one minor.
"""

from __future__ import annotations

import logging
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

#: What a non-envelope raises while being decoded and delivered.
NOT_AN_ENVELOPE = (ValueError, KeyError, TypeError, AttributeError, IndexError)


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except NOT_AN_ENVELOPE as exc:
            log.error("discarded a queue entry that is not a Celery message: %s: %s",
                      type(exc).__name__, str(exc)[:200])
            raise Empty() from exc


class Transport(kombu_redis.Transport):
    Channel = Channel
