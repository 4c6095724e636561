"""The worker's Celery app: the shared configuration plus the process hooks.

The model is loaded once per model-holding process: in the pool child under the prefork
pool (never before the fork: CUDA does not survive one), in the worker process itself under
the threads pool. The parent serves the merged metrics; the model-holding process warms the
model up and keeps the health key fresh for the Kubernetes probes.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from celery.signals import (
    celeryd_after_setup,
    task_postrun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from captioning import metrics
from captioning.broker import create_app
from captioning.errors import CaptionerError
from captioning.health import HealthBeacon
from captioning.settings import get_settings
from workers.observability import mark_process_dead, serve_metrics
from workers.routing import consume_order

log = logging.getLogger(__name__)

app = create_app(get_settings(), include=("workers.tasks",))

_beacon: HealthBeacon | None = None


def _threads_pool() -> bool:
    return get_settings().pool == "threads"


@celeryd_after_setup.connect
def _consume_kind_queues(instance: Any, **_: object) -> None:
    """Also consume the queue of every kind this worker serves, where other workers forward
    the kinds they do not serve (workers/routing.py), whatever `--queues` said."""
    queues = instance.app.amqp.queues
    queues.select(consume_order(queues.consume_from, get_settings().kinds))
    log.info("consuming %s", ", ".join(queues.consume_from))


@worker_init.connect
def _start_worker(**_: object) -> None:
    port = get_settings().metrics_port
    if port:
        try:
            serve_metrics(port)
            log.info("metrics on :%d/metrics", port)
        except OSError as exc:
            log.error("cannot serve metrics on port %d (CAPTIONER_METRICS_PORT): %s", port, exc)
    if _threads_pool():
        _load_model()


@worker_process_init.connect
def _start_pool_process(**_: object) -> None:
    _load_model()


def _load_model() -> None:
    """Load and warm the model before the first job.

    A worker that cannot load its model can do nothing useful: stop the whole worker so
    Kubernetes shows the error (CrashLoopBackOff) instead of a pod that fails every job.
    """
    global _beacon  # noqa: PLW0603 - one beacon per model-holding process
    from workers.context import get_context

    settings = get_settings()
    _beacon = HealthBeacon(settings.broker_url, model=settings.model, pid=os.getpid())
    _beacon.start()
    try:
        context = get_context(settings)
    except CaptionerError as exc:
        log.critical("cannot start: %s", exc)
        if _threads_pool():
            raise SystemExit(1) from exc
        os.kill(os.getppid(), signal.SIGTERM)
        raise
    metrics.MODEL_LOADED.set(1)
    metrics.MODEL_WARMED.set(1)  # every runtime's load warms up before returning
    for runtime in context.runtimes.values():
        metrics.BUILD_INFO.labels(version=_version(), model=runtime.name).set(1)
    _beacon.warmed = True
    _beacon.beat()
    log.info(
        "worker %s ready: %s", context.name,
        "; ".join(f"{kind} by {runtime.name}, micro-batch {runtime.batch_size}"
                  for kind, runtime in context.runtimes.items()),
    )


@task_postrun.connect
def _gpu_memory(**_: Any) -> None:
    from workers.context import current_context

    if current_context() is None:
        return
    import torch

    if torch.cuda.is_initialized():
        metrics.GPU_MEMORY_BYTES.set(torch.cuda.memory_allocated())


@worker_process_shutdown.connect
def _stop_pool_process(**_: object) -> None:
    _close()


@worker_shutdown.connect
def _stop_worker(**_: object) -> None:
    if _threads_pool():
        _close()


def _close() -> None:
    from workers.context import close_context

    if _beacon is not None:
        _beacon.stop()
    close_context()
    mark_process_dead(os.getpid())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("captioner")
    except PackageNotFoundError:
        return "unknown"
