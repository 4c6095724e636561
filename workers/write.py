"""Writing results: the database row first (the system of record), then the S3 sidecar."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor

from captioning.results import CaptionRow, ResultsStore, sidecar_body, sidecar_key
from captioning.storage import Stores
from captioning.uris import parse_prefix


class ResultWriter:
    def __init__(
        self, results: ResultsStore, stores: Stores, results_uri: str | None, executor: Executor
    ) -> None:
        self._results = results
        self._stores = stores
        self._executor = executor
        self._sidecar_root = parse_prefix(results_uri) if results_uri else None

    def write(self, rows: Sequence[CaptionRow], *, main_prompt: str | None = None) -> None:
        """Upsert all rows in one statement, then put sidecars in parallel; raise if any fails.
        Caption rows of another prompt than the job's first (`main_prompt`) get sidecars
        of their own."""
        self._results.upsert(rows)
        root = self._sidecar_root
        if root is None:
            return
        store = self._stores.for_location(root)
        futures = [
            self._executor.submit(
                store.put,
                root.bucket,
                sidecar_key(root.key, row, main_prompt=main_prompt),
                sidecar_body(row),
                "application/json",
            )
            for row in rows
        ]
        for future in futures:
            future.result()
