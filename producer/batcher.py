"""Group a burst of events into few jobs without delaying a lone upload.

Listener threads submit references and get a future. One flusher thread hands everything
waiting to `flush` when `batch_size` references wait or `linger_s` has passed since the
first of them, whichever comes first; the futures complete only after `flush` returns, so
an SQS message is deleted (or a webhook answered 2xx) only once its jobs are in Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from captioning.errors import CaptionerError
from producer.events import ObjectRef

log = logging.getLogger(__name__)

DEFAULT_LINGER_S = 0.05


class BatcherClosed(CaptionerError):
    """The listener is shutting down; the event stays with its sender for redelivery."""


class LingerBatcher:
    def __init__(
        self,
        flush: Callable[[list[ObjectRef]], None],
        *,
        batch_size: int,
        linger_s: float = DEFAULT_LINGER_S,
    ) -> None:
        self._flush = flush
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._pending: list[tuple[Sequence[ObjectRef], Future[None]]] = []
        self._count = 0
        self._first_at = 0.0
        self._closed = False
        self._wakeup = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, refs: Sequence[ObjectRef]) -> Future[None]:
        future: Future[None] = Future()
        if not refs:
            future.set_result(None)
            return future
        with self._wakeup:
            if self._closed:
                raise BatcherClosed("the listener is shutting down")
            if not self._pending:
                self._first_at = time.monotonic()
            self._pending.append((refs, future))
            self._count += len(refs)
            self._wakeup.notify()
        return future

    def close(self, timeout: float = 30) -> None:
        """Flush what is waiting, then stop the flusher thread."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join(timeout)

    def _next_batch(self) -> list[tuple[Sequence[ObjectRef], Future[None]]] | None:
        with self._wakeup:
            while not self._pending and not self._closed:
                self._wakeup.wait()
            while self._count < self._batch_size and not self._closed:
                remaining = self._first_at + self._linger_s - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.wait(remaining)
            taken, self._pending, self._count = self._pending, [], 0
            return taken or None

    def _run(self) -> None:
        while (taken := self._next_batch()) is not None:
            refs = [ref for submitted, _ in taken for ref in submitted]
            try:
                self._flush(refs)
            except Exception as exc:
                log.error("enqueue of %d event images failed: %s", len(refs), exc)
                for _, future in taken:
                    future.set_exception(exc)
            else:
                for _, future in taken:
                    future.set_result(None)
