"""Backfill progress: a bar with rate and ETA on a terminal, a log line every so often elsewhere.

The bar counts listed objects, the only total anyone can know up front (from S3 Inventory or
CloudWatch's NumberOfObjects, passed as `--total`); without it the bar shows counts and rate.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

from captioning.checkpoints import Checkpoint

log = logging.getLogger("captioner.backfill")

LOG_INTERVAL_S = 30.0


class Progress:
    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        total: int | None = None,
        stream: TextIO = sys.stderr,
        interval_s: float = LOG_INTERVAL_S,
    ) -> None:
        self._interactive = stream.isatty()
        self._interval_s = interval_s
        self._started = time.monotonic()
        self._first_listed = checkpoint.listed
        self._logged_at = self._started
        self._bar = tqdm(
            total=total, initial=checkpoint.listed, unit=" objects", desc=checkpoint.name,
            file=stream, dynamic_ncols=True, disable=not self._interactive,
        )

    def update(self, checkpoint: Checkpoint, paused_s: float = 0.0) -> None:
        if self._interactive:
            self._bar.update(checkpoint.listed - self._bar.n)
            self._bar.set_postfix(
                enqueued=checkpoint.enqueued, skipped=checkpoint.skipped,
                paused=f"{paused_s:.0f}s", refresh=False,
            )
            return
        now = time.monotonic()
        if now - self._logged_at >= self._interval_s:
            self._logged_at = now
            self.log_line(checkpoint, paused_s)

    def log_line(self, checkpoint: Checkpoint, paused_s: float = 0.0) -> None:
        elapsed = max(1e-9, time.monotonic() - self._started)
        rate = (checkpoint.listed - self._first_listed) / elapsed
        log.info(
            "backfill %s: listed %d (%.0f/s), enqueued %d in %d jobs, skipped %d, "
            "paused %.0f s, at key %r%s",
            checkpoint.name, checkpoint.listed, rate, checkpoint.enqueued, checkpoint.jobs,
            checkpoint.skipped, paused_s, checkpoint.last_key,
            ", finished" if checkpoint.finished else "",
        )

    def close(self, checkpoint: Checkpoint, paused_s: float = 0.0) -> None:
        self.update(checkpoint, paused_s)
        self._bar.close()
        if not self._interactive:
            self.log_line(checkpoint, paused_s)
