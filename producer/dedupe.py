"""Drop repeated deliveries of the same upload event before they become jobs.

S3 (and SQS, and webhook senders that retry) deliver at least once. An event is identified
by bucket, key and etag/version id, so a re-upload of the same key (a new etag) is captioned
again while a redelivery is not. Each identity is claimed with `SET NX EX` in Redis, shared by
every listener replica; the key is a fixed-size hash so a 1 KiB object key costs no more.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import redis

from captioning import keys
from producer.events import ObjectRef

DEFAULT_TTL_S = 6 * 3600


def claim_key(ref: ObjectRef) -> str:
    identity = f"{ref.bucket}\0{ref.key}\0{ref.etag or ''}\0{ref.version_id or ''}"
    return keys.seen_key(hashlib.blake2b(identity.encode(), digest_size=16).hexdigest())


class Deduper:
    """Claims event identities for `ttl_s` seconds; a claim is released if its enqueue fails."""

    def __init__(self, client: redis.Redis, ttl_s: int = DEFAULT_TTL_S) -> None:
        self._redis = client
        self._ttl_s = ttl_s

    def claim(self, refs: Sequence[ObjectRef]) -> list[ObjectRef]:
        """The refs seen for the first time, in order; repeats within `refs` count as seen."""
        unique = list(dict.fromkeys(refs))
        if not unique:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for ref in unique:
            pipe.set(claim_key(ref), b"1", nx=True, ex=self._ttl_s)
        return [ref for ref, fresh in zip(unique, pipe.execute(), strict=True) if fresh]

    def release(self, refs: Sequence[ObjectRef]) -> None:
        """Forget claims whose jobs were not enqueued, so the redelivery is not dropped."""
        if refs:
            self._redis.delete(*(claim_key(ref) for ref in refs))
