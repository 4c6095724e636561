"""`captioner listen sqs|webhook`: S3 upload events become realtime jobs."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from captioning.errors import ConfigError
from captioning.messages import REALTIME_QUEUE, WORK_QUEUES
from captioning.settings import get_settings
from cli.arguments import positive

if TYPE_CHECKING:
    from producer.batcher import LingerBatcher

log = logging.getLogger("captioner")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    listen = commands.add_parser("listen", help="turn S3 upload events into realtime jobs")
    sources = listen.add_subparsers(required=True, metavar="SOURCE")
    sqs = sources.add_parser("sqs", help="long-poll an SQS queue fed by S3 event notifications")
    sqs.add_argument("--queue-url", required=True, metavar="URL",
                     help="the SQS queue S3 sends its event notifications to")
    sqs.add_argument("--receivers", type=positive, default=2, help="parallel long polls")
    sqs.add_argument("--endpoint-url", help="SQS endpoint (default: AWS for the region)")
    webhook = sources.add_parser("webhook", help="HTTP endpoint for MinIO / Ceph RGW events")
    webhook.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    webhook.add_argument("--port", type=int, default=8080,
                         help="port to listen on (default %(default)s)")
    webhook.add_argument("--max-body-bytes", type=positive, default=1024 * 1024, metavar="BYTES",
                         help="refuse larger event bodies with 413 (default 1 MiB)")
    for parser_ in (sqs, webhook):
        parser_.add_argument("--queue", default=REALTIME_QUEUE, choices=WORK_QUEUES,
                             help="queue to send to (default %(default)s)")
        parser_.add_argument("--batch-size", type=positive, default=32, help="images per job")
        parser_.add_argument("--linger-ms", type=int, default=50,
                             help="wait this long for more events to fill a job (default 50)")
        parser_.add_argument("--dedupe-ttl", type=positive, default=6 * 3600, metavar="SECONDS",
                             help="drop repeats of an event for this long (default 6 h)")
    sqs.set_defaults(run=cmd_listen_sqs)
    webhook.set_defaults(run=cmd_listen_webhook)


def cmd_listen_sqs(args: argparse.Namespace) -> int:
    from producer.listeners import SqsListener, open_queue

    client = open_queue(args.queue_url, args.endpoint_url)
    with event_batcher(args) as batcher:
        listener = SqsListener(client, args.queue_url, batcher, receivers=args.receivers)
        stop_on_signals(listener.stopping.set)
        listener.run()
    return 0


def cmd_listen_webhook(args: argparse.Namespace) -> int:
    from producer.listeners import WebhookServer

    settings = get_settings()
    secret = settings.webhook_secret
    if secret is None or not secret.get_secret_value():
        raise ConfigError(
            "set CAPTIONER_WEBHOOK_SECRET: senders must present it as "
            "'Authorization: Bearer <secret>' (MinIO auth_token) or 'X-Captioner-Secret'"
        )
    with event_batcher(args) as batcher:
        server = WebhookServer(
            (args.host, args.port), batcher, secret=secret.get_secret_value(),
            socket_timeout_s=settings.webhook_timeout_s, max_body_bytes=args.max_body_bytes,
        )
        stop_on_signals(lambda: threading.Thread(target=server.shutdown).start())
        log.info("webhook listening on %s:%d", args.host, server.server_address[1])
        with server:
            server.serve_forever()
    return 0


@contextmanager
def event_batcher(args: argparse.Namespace) -> Iterator[LingerBatcher]:
    """Sender, deduper and batcher for a listener; flushes what is waiting on the way out."""
    from captioning.broker import create_app
    from captioning.connections import redis_client
    from producer.batcher import LingerBatcher
    from producer.dedupe import Deduper
    from producer.enqueue import JobSender
    from producer.listeners import EventEnqueuer

    settings = get_settings()
    broker = redis_client(settings.broker_url)
    broker.ping()  # a listener without Redis fails now, not on the first upload it accepts
    deduper = Deduper(broker, ttl_s=args.dedupe_ttl)
    with JobSender(create_app(settings), args.queue) as sender:
        enqueuer = EventEnqueuer(sender, deduper, settings, args.batch_size)
        batcher = LingerBatcher(
            enqueuer, batch_size=args.batch_size, linger_s=args.linger_ms / 1000
        )
        try:
            yield batcher
        finally:
            batcher.close()
            log.info(
                "listener stopped: %d images in %d jobs, %d duplicates dropped",
                sender.images_sent, sender.jobs_sent, enqueuer.duplicates,
            )


def stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM (Kubernetes) and SIGINT stop taking events; what was taken is still enqueued."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop())
