"""What a worker process holds for its lifetime: the models, stores, results and thread pools.

Built once per process (after the prefork fork, so CUDA and connection pools are never
shared across processes) and reused by every job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from captioning.errors import DatabaseUnavailable
from captioning.results import ResultsStore
from captioning.settings import Settings
from captioning.storage import Stores
from workers.pipeline import Stages
from workers.runtimes.base import Runtime
from workers.runtimes.registry import load_runtimes
from workers.write import ResultWriter

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    settings: Settings
    stores: Stores
    results: ResultsStore
    writer: ResultWriter
    #: kind -> its loaded model, for every kind in CAPTIONER_KINDS.
    runtimes: dict[str, Runtime]
    io_pool: ThreadPoolExecutor
    decode_pool: ThreadPoolExecutor
    stages: Stages
    #: Held by the job on the models; the other jobs in flight fetch and decode meanwhile.
    model_turn: threading.Lock
    name: str

    @classmethod
    def create(cls, settings: Settings) -> WorkerContext:
        stores = Stores(settings)
        results = ResultsStore(settings.database_url)
        try:
            results.require_schema()
        except DatabaseUnavailable as exc:
            log.warning("cannot check the results table now (%s); jobs retry until it is back",
                        exc)
        # Every job in flight fetches through the same threads (and writes its sidecars there).
        io_pool = ThreadPoolExecutor(
            settings.fetch_concurrency * jobs_per_process(settings), thread_name_prefix="io"
        )
        decode_pool = ThreadPoolExecutor(
            settings.decode_threads or decode_threads(), thread_name_prefix="decode"
        )
        runtimes = load_runtimes(settings)
        stages = Stages.for_runtimes(
            runtimes, stores=stores, settings=settings, io_pool=io_pool, decode_pool=decode_pool
        )
        return cls(
            settings=settings,
            stores=stores,
            results=results,
            writer=ResultWriter(
                results, stores, settings.results_uri, io_pool, settings.results_format
            ),
            runtimes=runtimes,
            io_pool=io_pool,
            decode_pool=decode_pool,
            stages=stages,
            model_turn=threading.Lock(),
            name=f"{socket.gethostname()}:{os.getpid()}",
        )

    def close(self) -> None:
        self.io_pool.shutdown(wait=False, cancel_futures=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.results.dispose()


def jobs_per_process(settings: Settings) -> int:
    """Jobs one model-holding process runs at once: one under prefork, more under threads."""
    return settings.jobs_in_flight if settings.pool == "threads" else 1


def decode_threads() -> int:
    """Pillow releases the GIL while decoding and resizing, so one thread per usable core
    pays off; more would only queue on the cores (and the model needs one too)."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


_context: WorkerContext | None = None
_creating = threading.Lock()  # the jobs in flight are threads: one model, never two


def get_context(settings: Settings) -> WorkerContext:
    global _context  # noqa: PLW0603 - one context per process, by design
    with _creating:
        if _context is None:
            _context = WorkerContext.create(settings)
        return _context


def current_context() -> WorkerContext | None:
    return _context


def close_context() -> None:
    global _context  # noqa: PLW0603
    with _creating:
        if _context is not None:
            _context.close()
            _context = None
