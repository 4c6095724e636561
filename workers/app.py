"""The worker's Celery app: the shared configuration plus the task and process hooks.

One worker process per GPU runs `jobs_in_flight` jobs in threads that share its one model
(`model_turn` lets one job generate at a time): while a job generates, the next one, already
reserved, is fetched and decoded, and the previous one writes its rows, so the GPU does not
wait between jobs. A prefork pool cannot do that: the parent cannot hand a reserved job to
the busy child, and a second child would load a second copy of the model.
"""

from __future__ import annotations

import logging

from celery.signals import worker_init, worker_shutdown

from captioning.broker import create_app
from captioning.errors import CaptionerError
from captioning.settings import get_settings

log = logging.getLogger(__name__)

app = create_app(get_settings(), include=("workers.tasks",))
app.conf.worker_pool = "threads"
app.conf.worker_concurrency = get_settings().jobs_in_flight


@worker_init.connect
def _load_model(**_: object) -> None:
    """Load the model when the worker starts, before it takes its first job.

    A worker that cannot load its model can do nothing useful: exit non-zero so Kubernetes
    shows the error (CrashLoopBackOff) instead of a pod that fails every job.
    """
    from workers.context import get_context

    try:
        context = get_context(get_settings())
    except CaptionerError as exc:
        log.critical("cannot start: %s", exc)
        raise SystemExit(1) from exc
    model = context.model
    log.info(
        "worker %s ready: model %s on %s, micro-batch %d",
        context.name, model.name, model.device, model.batch_size,
    )


@worker_shutdown.connect
def _close(**_: object) -> None:
    from workers.context import close_context

    close_context()
