"""Concurrent, size-capped object GETs with per-object retries of transient errors."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Executor

from captioning.errors import ImageError, StoreUnavailable
from captioning.storage import StoredObject, Stores
from captioning.uris import ImageLocation
from workers.retry import backoff_seconds

Fetched = StoredObject | ImageError

FETCH_ATTEMPTS = 4


def fetch_one(
    stores: Stores,
    location: ImageLocation,
    *,
    max_bytes: int,
    version_id: str | None,
    attempts: int = FETCH_ATTEMPTS,
) -> Fetched:
    """Return the object or the image's own error; raise StoreUnavailable once retries run out."""
    store = stores.for_location(location)
    attempt = 0
    while True:
        try:
            return store.get(location, max_bytes=max_bytes, version_id=version_id)
        except ImageError as exc:
            return exc
        except StoreUnavailable:
            attempt += 1
            if attempt >= attempts:
                raise
            time.sleep(backoff_seconds(attempt, base=0.5, cap=8.0))


def fetch_all(
    stores: Stores,
    requests: Sequence[tuple[ImageLocation, str | None]],
    *,
    max_bytes: int,
    executor: Executor,
) -> list[Fetched]:
    """Fetch (location, version_id) pairs in parallel, keeping their order."""
    futures = [
        executor.submit(fetch_one, stores, location, max_bytes=max_bytes, version_id=version)
        for location, version in requests
    ]
    return [future.result() for future in futures]
