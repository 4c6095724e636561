"""`captioner worker`: one Celery worker per GPU."""

from __future__ import annotations

import argparse
import os

from captioning.messages import WORK_QUEUES
from captioning.settings import get_settings
from cli.arguments import positive


def add_parsers(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser("worker", help="run a captioning worker (one per GPU)")
    worker.add_argument("--queues", default=",".join(WORK_QUEUES),
                        help="queues to consume, first served first")
    worker.add_argument("--pool", choices=("prefork", "threads"), default=None,
                        help="default CAPTIONER_POOL (prefork); see README, Performance")
    worker.add_argument("--concurrency", type=positive, default=None,
                        help="threads pool: jobs held at once sharing one model (default "
                             "CAPTIONER_JOBS_IN_FLIGHT); prefork: model processes (default 1)")
    worker.add_argument("--loglevel", default="INFO",
                        help="Celery's log level: DEBUG, INFO, WARNING or ERROR (default INFO)")
    worker.set_defaults(run=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.observability import prepare_multiprocess_dir

    prepare_multiprocess_dir()
    from workers.app import app

    settings = get_settings()
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    pool = args.pool or settings.pool
    if args.pool and args.pool != settings.pool:
        os.environ["CAPTIONER_POOL"] = args.pool  # the pool hooks read it from the settings
        get_settings.cache_clear()
    default_concurrency = settings.jobs_in_flight if pool == "threads" else 1
    app.worker_main(
        [
            "worker",
            "--queues", ",".join(queues),
            "--pool", pool,
            "--concurrency", str(args.concurrency or default_concurrency),
            "--loglevel", args.loglevel,
            "--hostname", "captioner@%h",
            "--without-gossip", "--without-mingle",
        ]
    )
    return 0
