"""The worker's Celery app: the shared configuration plus the task and per-process hooks."""

from __future__ import annotations

import logging
import os
import signal

from celery.signals import worker_process_init, worker_process_shutdown

from captioning.broker import create_app
from captioning.errors import CaptionerError
from captioning.settings import get_settings

log = logging.getLogger(__name__)

app = create_app(get_settings(), include=("workers.tasks",))


@worker_process_init.connect
def _load_model(**_: object) -> None:
    """Load the model when the pool process starts, not on the first job.

    A worker that cannot load its model can do nothing useful: stop the whole worker so
    Kubernetes shows the error (CrashLoopBackOff) instead of a pod that fails every job.
    """
    from workers.context import get_context

    try:
        context = get_context(get_settings())
    except CaptionerError as exc:
        log.critical("cannot start: %s", exc)
        os.kill(os.getppid(), signal.SIGTERM)
        raise
    model = context.model
    log.info("worker %s ready: model %s on %s", context.name, model.name, model.device)


@worker_process_shutdown.connect
def _close(**_: object) -> None:
    from workers.context import close_context

    close_context()
