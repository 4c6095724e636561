"""What a worker process holds for its lifetime: the model, stores, results and thread pools.

Built once per process (after the prefork fork, so CUDA and connection pools are never
shared across processes) and reused by every job.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from captioning.results import ResultsStore
from captioning.settings import Settings
from captioning.storage import Stores
from workers.model import CaptionModel
from workers.write import ResultWriter


@dataclass
class WorkerContext:
    settings: Settings
    stores: Stores
    results: ResultsStore
    writer: ResultWriter
    model: CaptionModel
    io_pool: ThreadPoolExecutor
    decode_pool: ThreadPoolExecutor
    name: str

    @classmethod
    def create(cls, settings: Settings) -> WorkerContext:
        stores = Stores(settings)
        results = ResultsStore(settings.database_url)
        io_pool = ThreadPoolExecutor(settings.fetch_concurrency, thread_name_prefix="io")
        decode_pool = ThreadPoolExecutor(decode_threads(), thread_name_prefix="decode")
        return cls(
            settings=settings,
            stores=stores,
            results=results,
            writer=ResultWriter(results, stores, settings.results_uri, io_pool),
            model=CaptionModel.load(settings),
            io_pool=io_pool,
            decode_pool=decode_pool,
            name=f"{socket.gethostname()}:{os.getpid()}",
        )

    def close(self) -> None:
        self.io_pool.shutdown(wait=False, cancel_futures=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.results.dispose()


def decode_threads() -> int:
    """Pillow releases the GIL while decoding, so one thread per usable core pays off."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


_context: WorkerContext | None = None


def get_context(settings: Settings) -> WorkerContext:
    global _context  # noqa: PLW0603 - one context per process, by design
    if _context is None:
        _context = WorkerContext.create(settings)
    return _context


def current_context() -> WorkerContext | None:
    return _context


def close_context() -> None:
    global _context  # noqa: PLW0603
    if _context is not None:
        _context.close()
        _context = None
