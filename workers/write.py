"""Writing results: the database rows first (the system of record), then the copy in S3:
one JSON sidecar per image and kind, or one Parquet object per job and model
(`CAPTIONER_RESULTS_FORMAT`)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor

from captioning.parquet import job_object_key, parquet_bytes
from captioning.results import CaptionRow, ResultsStore, sidecar_body, sidecar_key
from captioning.storage import Stores
from captioning.uris import parse_prefix

PARQUET_TYPE = "application/vnd.apache.parquet"


class ResultWriter:
    def __init__(
        self,
        results: ResultsStore,
        stores: Stores,
        results_uri: str | None,
        executor: Executor,
        results_format: str = "sidecar",
    ) -> None:
        self._results = results
        self._stores = stores
        self._executor = executor
        self._root = parse_prefix(results_uri) if results_uri else None
        self._format = results_format

    def write(self, rows: Sequence[CaptionRow], *, main_prompt: str | None = None) -> None:
        """Upsert all rows in one statement, then write the S3 copy; raise if any put fails.
        Caption rows of another prompt than the job's first (`main_prompt`) get sidecars
        of their own."""
        self._results.upsert(rows)
        root = self._root
        if root is None or not rows:
            return
        store = self._stores.for_location(root)
        if self._format == "parquet":  # one object per model of the job (kinds differ)
            for model in dict.fromkeys(row.model for row in rows):
                mine = [row for row in rows if row.model == model]
                store.put(root.bucket, job_object_key(root.key, mine), parquet_bytes(mine),
                          PARQUET_TYPE)
            return
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
