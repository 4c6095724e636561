"""The Celery app both sides share, configured against the known Celery-on-Redis pitfalls.

Producers only send with it; workers add the task and process hooks (workers/app.py).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from captioning.errors import BrokerUnavailable
from captioning.keys import UNACKED_INDEX_KEY, UNACKED_KEY
from captioning.messages import BULK_QUEUE, TASK_NAME, CaptionJob
from captioning.settings import Settings

#: Publishing retries for ~1 minute (0.2 s, then +0.5 s per try up to 3 s), so a producer or
#: a retrying worker rides out a Redis restart instead of failing after Celery's 0.6 s default.
PUBLISH_RETRY_POLICY = {
    "max_retries": 25,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 3.0,
}

#: One-shot commands (enqueue, backfill, dead requeue) give up after ~10 s of retries:
#: long enough for a Redis restart, short enough that a wrong CAPTIONER_BROKER_URL is
#: reported while the user is still looking.
COMMAND_PUBLISH_RETRY_POLICY = {
    "max_retries": 5,
    "interval_start": 0.5,
    "interval_step": 1.0,
    "interval_max": 3.0,
}
#: ... and a Redis that accepts the connection but never answers is an error, not a hang.
COMMAND_SOCKET_TIMEOUT_S = 5.0


UNACKED_MUTEX_EXPIRE_S = 15


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = {
        # Serve captions.realtime before captions.bulk: BRPOP in the listed order.
        "queue_order_strategy": "priority",
        # Named here so the exporter and `status` read the very hash kombu writes.
        "unacked_key": UNACKED_KEY,
        "unacked_index_key": UNACKED_INDEX_KEY,
        # Longer than the longest job plus its longest retry countdown (celery#5935).
        "visibility_timeout": settings.visibility_timeout_s,
        # The fetch script sets it on the worker's held set, as the heartbeat does.
        "held_ttl": settings.held_ttl_s,
        # The sweep restores what the heartbeat reaper released (captioning/heartbeats.py)
        # and what outlived the visibility timeout: often, so a vanished worker's job is
        # back within seconds of its heartbeat expiring.
        "unacked_restore_interval": restore_interval_s(settings.heartbeat_ttl_s),
        "unacked_restore_throttle": 1,
        # The sweep's lock outlives a worker killed while sweeping for this long, not 5 min.
        "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE_S,
        # Notice a broker that vanished without closing the socket (failover, NAT timeout).
        "socket_keepalive": True,
        # Bodies are JSON text: kombu's default base64 would add a third to every message.
        # The encoding travels in each message's properties, so workers read both forms.
        "body_encoding": "utf-8",
    }
    return {
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_acks_late": True,
        # A job whose pool process dies (kill -9, OOM killer) or runs past the hard time limit
        # goes back to the queue, never acked as done; workers/delivery.py bounds the loop.
        "task_reject_on_worker_lost": True,
        "task_acks_on_timeout": False,
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": transport,
        "visibility_timeout": settings.visibility_timeout_s,
        "task_time_limit": settings.job_deadline_s,
        "task_default_queue": BULK_QUEUE,
        "task_routes": {TASK_NAME: {"queue": BULK_QUEUE}},
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "broker_use_ssl": broker_ssl_options(settings.broker_url),
        "broker_transport": broker_transport(settings.broker_url),
    }


def broker_transport(broker_url: str) -> str | None:
    """Our hardened Redis transport for redis:// and rediss:// (see captioning/transport.py)."""
    if urlsplit(broker_url).scheme in ("redis", "rediss"):
        return "captioning.transport:Transport"
    return None


def restore_interval_s(heartbeat_ttl_s: int) -> int:
    return max(1, min(5, heartbeat_ttl_s // 4))


def broker_ssl_options(broker_url: str) -> dict[str, Any] | None:
    """TLS for `rediss://` URLs, verifying the server's certificate unless told otherwise.

    kombu falls back to CERT_NONE (no verification) for a bare `rediss://` URL; redis-py,
    which the dead letters and queue stats use, verifies. Both read `ssl_cert_reqs`,
    `ssl_ca_certs`, `ssl_certfile` and `ssl_keyfile` from the URL's query, so those stay the
    one place to configure TLS; this only makes verification the default for Celery too.
    """
    parts = urlsplit(broker_url)
    if parts.scheme != "rediss" or "ssl_cert_reqs" in parse_qs(parts.query):
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def create_app(
    settings: Settings, *, include: tuple[str, ...] = (), one_shot: bool = False
) -> Celery:
    """`one_shot`: for a command that sends and exits, which gives up on Redis sooner."""
    app = Celery("captioner", broker=settings.broker_url, include=list(include))
    app.conf.update(celery_config(settings))
    if one_shot:
        app.conf.task_publish_retry_policy = COMMAND_PUBLISH_RETRY_POLICY
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "socket_timeout": COMMAND_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": COMMAND_SOCKET_TIMEOUT_S,
        }
    return app


@contextmanager
def broker_errors() -> Iterator[None]:
    """Redis and kombu connection errors, wherever a command meets them, as BrokerUnavailable."""
    try:
        yield
    except redis.AuthenticationError as exc:
        raise BrokerUnavailable(f"Redis refused our credentials ({exc})") from exc
    except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BrokerUnavailable(f"Redis unreachable ({reason})") from exc


def send_job(
    app: Celery,
    job: CaptionJob,
    queue: str,
    *,
    producer: Any = None,
    task_id: str | None = None,
    declare: bool = True,
) -> None:
    """Publish one CaptionJob. A short `argsrepr` spares Celery a saferepr of every item: a
    third of the send time for a 32-image job, and ~250 bytes of each message in Redis.
    `declare=False` skips declaring the queue, done once per sender: a copy and bind per
    job cost a sixth of a send."""
    app.send_task(
        TASK_NAME,
        args=[job.to_message()],
        queue=queue,
        producer=producer,
        task_id=task_id,
        ignore_result=True,
        argsrepr=f"<{len(job.items)} images>",
        kwargsrepr="{}",
        **({} if declare else {"declare": []}),
    )
