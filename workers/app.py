"""The worker's Celery app: the shared configuration plus per-process hooks.

The parent process serves metrics; each pool process loads the model, warms it up, and
keeps a health key fresh for the Kubernetes probes.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from celery.signals import (
    task_postrun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)

from captioning import metrics
from captioning.broker import create_app
from captioning.errors import CaptionerError
from captioning.health import HealthBeacon
from captioning.settings import get_settings
from workers.observability import mark_process_dead, serve_metrics

log = logging.getLogger(__name__)

app = create_app(get_settings(), include=("workers.tasks",))

_beacon: HealthBeacon | None = None


@worker_init.connect
def _serve_metrics(**_: object) -> None:
    port = get_settings().metrics_port
    if not port:
        return
    try:
        serve_metrics(port)
    except OSError as exc:
        log.error("cannot serve metrics on port %d (CAPTIONER_METRICS_PORT): %s", port, exc)
        return
    log.info("metrics on :%d/metrics", port)


@worker_process_init.connect
def _load_model(**_: object) -> None:
    """Load and warm the model when the pool process starts, not on the first job.

    A worker that cannot load its model can do nothing useful: stop the whole worker so
    Kubernetes shows the error (CrashLoopBackOff) instead of a pod that fails every job.
    """
    global _beacon  # noqa: PLW0603 - one beacon per pool process
    from workers.context import get_context

    settings = get_settings()
    _beacon = HealthBeacon(settings.broker_url, model=settings.model, pid=os.getpid())
    _beacon.start()
    try:
        context = get_context(settings)
    except CaptionerError as exc:
        log.critical("cannot start: %s", exc)
        os.kill(os.getppid(), signal.SIGTERM)
        raise
    model = context.model
    metrics.MODEL_LOADED.set(1)
    metrics.BUILD_INFO.labels(version=_version(), model=model.name).set(1)
    model.warm_up(settings.prompt)
    metrics.MODEL_WARMED.set(1)
    _beacon.warmed = True
    _beacon.beat()
    log.info("worker %s ready: model %s on %s", context.name, model.name, model.device)


@task_postrun.connect
def _gpu_memory(**_: Any) -> None:
    from workers.context import current_context

    context = current_context()
    if context is not None and context.model.device.type == "cuda":
        import torch

        metrics.GPU_MEMORY_BYTES.set(torch.cuda.memory_allocated(context.model.device))


@worker_process_shutdown.connect
def _close(**_: object) -> None:
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
