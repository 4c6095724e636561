"""Operating the fleet: `captioner exporter`, `health`, `status` and `dead`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from captioning.messages import BULK_QUEUE, WORK_QUEUES
from captioning.settings import get_settings
from cli.arguments import positive


def add_parsers(commands: argparse._SubParsersAction) -> None:
    exporter = commands.add_parser("exporter", help="serve queue metrics for Prometheus")
    exporter.add_argument("--port", type=int, default=9809,
                          help="port of /metrics (default %(default)s)")
    exporter.set_defaults(run=cmd_exporter)

    health = commands.add_parser(
        "health", help="exit 0 if this host's worker is alive (--ready: and its model warmed)"
    )
    health.add_argument("--ready", action="store_true",
                        help="readiness: also require the model loaded and warmed")
    health.set_defaults(run=cmd_health)

    status = commands.add_parser(
        "status", help="queues, workers, throughput and backfill checkpoints"
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--window", type=positive, default=5, metavar="MINUTES",
                        help="throughput over the last MINUTES (default 5)")
    status.set_defaults(run=cmd_status)

    dead = commands.add_parser("dead", help="inspect or replay dead-lettered jobs")
    dead.add_argument(
        "action", choices=("list", "requeue", "purge"),
        help="list: print letters as JSON lines; requeue: send valid jobs back to their "
        "queue; purge: delete them all",
    )
    dead.add_argument("--limit", type=positive, default=100, help="letters to list, oldest first")
    dead.set_defaults(run=cmd_dead)


def cmd_exporter(args: argparse.Namespace) -> int:
    import os
    import socket

    from captioning.broker import create_app
    from captioning.connections import redis_client
    from captioning.exporter import serve
    from captioning.reconcile import Reconciler

    settings = get_settings()
    serve(settings.broker_url, args.port)
    # Always running, unlike workers scaled to zero: its reconciler is what puts uploads
    # that Redis lost back in the queue, which then scales the workers up again.
    Reconciler.start_in_fleet(
        settings, create_app(settings), redis_client(settings.broker_url, retries=0),
        owner=f"exporter:{socket.gethostname()}:{os.getpid()}",
    )
    print(f"serving queue metrics on :{args.port}/metrics")
    while True:
        time.sleep(3600)


def cmd_health(args: argparse.Namespace) -> int:
    import socket

    import redis

    from captioning.connections import redis_client
    from captioning.health import is_healthy, read_health

    # No retries: the probe has its own deadline (timeoutSeconds) and kubelet runs it again.
    client = redis_client(get_settings().broker_url, retries=0, timeout_s=3)
    try:
        health = read_health(client, socket.gethostname())
    except redis.RedisError as exc:
        print(f"unhealthy: broker unreachable ({type(exc).__name__}): start Redis or fix "
              "CAPTIONER_BROKER_URL", file=sys.stderr)
        return 1
    if is_healthy(health, ready=args.ready, now=time.time()):
        return 0
    if health is None:
        reason = "no health key for this host: is the worker running?"
    elif health.warmed:
        reason = f"health key is {time.time() - health.updated_at:.0f} s old"
    else:
        reason = "model not loaded and warmed yet"
    print(f"unhealthy: {reason}", file=sys.stderr)
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    from captioning.status import collect_status, format_status

    report = collect_status(get_settings(), window_s=args.window * 60)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_status(report))
    return 0


def cmd_dead(args: argparse.Namespace) -> int:
    from captioning.broker import create_app
    from captioning.connections import command_client
    from captioning.deadletters import DeadLetter, DeadLetters
    from captioning.errors import InvalidJob
    from captioning.messages import CaptionJob
    from producer.enqueue import JobSender

    settings = get_settings()
    letters = DeadLetters(command_client(settings.broker_url))
    if args.action == "list":
        for letter in letters.list(args.limit):
            print(json.dumps(letter.__dict__, default=str))
        return 0
    if args.action == "purge":
        print(f"purged {letters.purge()} dead-lettered jobs")
        return 0
    app = create_app(settings, one_shot=True)

    def send(letter: DeadLetter) -> bool:
        try:
            job = CaptionJob.from_message(letter.payload)
        except InvalidJob:
            return False
        queue = letter.queue if letter.queue in WORK_QUEUES else BULK_QUEUE
        with JobSender(app, queue) as sender:
            sender.send(job)
        return True

    sent, kept = letters.requeue(send)
    print(f"requeued {sent} jobs")
    if kept:
        print(f"kept {kept} that are not valid CaptionJobs: inspect them with "
              "`captioner dead list`, drop them with `captioner dead purge`")
    return 0
