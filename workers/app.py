"""The worker's Celery app: the shared configuration plus the process hooks.

The model is loaded once per model-holding process: in the pool child under the prefork
pool (never before the fork: CUDA does not survive one), in the worker process itself under
the threads pool. The parent serves the merged metrics and, being the process that reserves
and acks messages, sends the heartbeat that lets other workers requeue its jobs if it
vanishes; the model-holding process warms the model up and keeps the health key fresh for
the Kubernetes probes.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import redis
from celery.signals import (
    celeryd_after_setup,
    task_postrun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from captioning import metrics
from captioning.broker import create_app
from captioning.connections import redis_client
from captioning.durability import read_durability
from captioning.errors import CaptionerError
from captioning.health import HealthBeacon
from captioning.heartbeats import Heartbeat, beat_interval_s
from captioning.reconcile import Reconciler
from captioning.settings import get_settings
from workers.observability import mark_process_dead, serve_metrics
from workers.routing import consume_order

log = logging.getLogger(__name__)

app = create_app(get_settings(), include=("workers.tasks",))

_beacon: HealthBeacon | None = None
_heartbeat: Heartbeat | None = None
_reconciler: Reconciler | None = None


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


@worker_ready.connect
def _start_fleet_duties(**_: object) -> None:
    """The heartbeat, and the reconciler of pending uploads (one sweeps at a time)."""
    global _heartbeat, _reconciler  # noqa: PLW0603 - one of each per worker (main) process
    settings = get_settings()
    client = redis_client(settings.broker_url, retries=0, timeout_s=5)  # both loop on errors
    _heartbeat = Heartbeat(
        client, ttl_s=settings.heartbeat_ttl_s, held_ttl_s=settings.held_ttl_s
    )
    _heartbeat.start()
    log.info("heartbeat %s every %.1f s; jobs of workers silent for %d s are requeued",
             _heartbeat.id, beat_interval_s(settings.heartbeat_ttl_s), settings.heartbeat_ttl_s)
    _reconciler = Reconciler.start_in_fleet(settings, app, client, owner=_heartbeat.id)
    _warn_if_redis_can_lose_jobs(client)


def _warn_if_redis_can_lose_jobs(client: redis.Redis) -> None:
    try:
        warnings = read_durability(client).warnings()
    except redis.RedisError as exc:
        log.warning("cannot check whether Redis keeps its data (%s)", type(exc).__name__)
        return
    for warning in warnings:
        log.warning("%s (see the README, Deploy)", warning)


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
    if _reconciler is not None:
        _reconciler.stop()
    if _heartbeat is not None:
        _heartbeat.stop()
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
