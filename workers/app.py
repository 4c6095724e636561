"""The worker's Celery app: the shared configuration plus the task and per-process hooks."""

from __future__ import annotations

import logging

from celery.signals import worker_process_init, worker_process_shutdown

from captioning.broker import create_app
from captioning.settings import get_settings

log = logging.getLogger(__name__)

app = create_app(get_settings(), include=("workers.tasks",))


@worker_process_init.connect
def _load_model(**_: object) -> None:
    """Load the model when the pool process starts, not on the first job."""
    from workers.context import get_context

    context = get_context(get_settings())
    model = context.model
    log.info("worker %s ready: model %s on %s", context.name, model.name, model.device)
    if model.is_placeholder:
        log.warning(model.PLACEHOLDER_NOTICE)


@worker_process_shutdown.connect
def _close(**_: object) -> None:
    from workers.context import close_context

    close_context()
