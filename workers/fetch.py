"""Size-capped object GETs with per-object retries of transient errors (run many at once
from the worker's I/O threads, see workers/pipeline.py).

This is the only retry layer of a GET: botocore makes one attempt (captioning/storage.py),
so an object store outage costs FETCH_ATTEMPTS GETs per image per job attempt.
"""

from __future__ import annotations

import time

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
