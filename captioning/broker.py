"""The Celery app both sides share, configured against the known Celery-on-Redis pitfalls.

Producers only send with it; workers add the task and process hooks (workers/app.py).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from captioning.messages import BULK_QUEUE, TASK_NAME
from captioning.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = {
        # Serve captions.realtime before captions.bulk: BRPOP in the listed order.
        "queue_order_strategy": "priority",
        # Longer than the longest job plus its longest retry countdown (celery#5935).
        "visibility_timeout": settings.visibility_timeout_s,
    }
    return {
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": transport,
        "visibility_timeout": settings.visibility_timeout_s,
        "task_time_limit": settings.job_time_limit_s,
        "task_default_queue": BULK_QUEUE,
        "task_routes": {TASK_NAME: {"queue": BULK_QUEUE}},
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }


def create_app(settings: Settings, *, include: tuple[str, ...] = ()) -> Celery:
    app = Celery("captioner", broker=settings.broker_url, include=list(include))
    app.conf.update(celery_config(settings))
    return app
