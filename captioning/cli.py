"""The `captioner` command: the one place that knows both producers and workers."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from captioning.errors import CaptionerError, ConfigError
from captioning.messages import BULK_QUEUE, REALTIME_QUEUE, WORK_QUEUES
from captioning.results import CaptionRow, ResultsStore
from captioning.settings import Settings, get_settings

if TYPE_CHECKING:
    from producer.batcher import LingerBatcher

log = logging.getLogger("captioner")

SAMPLES_DIR = Path(__file__).parent / "samples"
TINY_MODEL = "tiny-random-blip2"
REAL_MODEL = "Salesforce/blip2-opt-2.7b"
DEFAULT_MAX_QUEUE_DEPTH = 100_000
RESULT_COLUMNS = ("status", "uri", "caption", "error", "width", "height", "model", "finished_at")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("CAPTIONER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except CaptionerError as exc:
        print(f"captioner: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("captioner: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captioner",
        description="Caption images at scale with BLIP-2. Settings come from CAPTIONER_* "
        "environment variables (see README).",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    enqueue = commands.add_parser("enqueue", help="send image URIs to the workers")
    enqueue.add_argument("uris", nargs="*", metavar="URI", help="s3://bucket/key or file:///path")
    enqueue.add_argument("--from-file", metavar="F", help="read URIs, one per line ('-' = stdin)")
    enqueue.add_argument("--queue", default=REALTIME_QUEUE, choices=WORK_QUEUES)
    enqueue.add_argument("--batch-size", type=positive, default=32, help="images per job")
    enqueue.set_defaults(run=cmd_enqueue)

    add_backfill_parser(commands)
    add_listen_parser(commands)

    worker = commands.add_parser("worker", help="run a captioning worker (one per GPU)")
    worker.add_argument("--queues", default=",".join(WORK_QUEUES),
                        help="queues to consume, first served first")
    worker.add_argument("--pool", choices=("prefork", "threads"), default=None,
                        help="default CAPTIONER_POOL (prefork); see README, Performance")
    worker.add_argument("--concurrency", type=positive, default=None,
                        help="threads pool: jobs held at once sharing one model (default "
                             "CAPTIONER_JOBS_IN_FLIGHT); prefork: model processes (default 1)")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(run=cmd_worker)

    exporter = commands.add_parser("exporter", help="serve queue metrics for Prometheus")
    exporter.add_argument("--port", type=int, default=9809)
    exporter.set_defaults(run=cmd_exporter)

    health = commands.add_parser(
        "health", help="exit 0 if this host's worker is alive (--ready: and its model warmed)"
    )
    health.add_argument("--ready", action="store_true")
    health.set_defaults(run=cmd_health)

    results = commands.add_parser("results", help="print caption rows")
    results.add_argument("--format", choices=("table", "jsonl", "csv"), default="table")
    results.add_argument("--prefix", help="only URIs starting with this, e.g. s3://bucket/dir/")
    results.add_argument("--status", choices=("ok", "failed"))
    results.add_argument("--limit", type=positive)
    results.set_defaults(run=cmd_results)

    status = commands.add_parser(
        "status", help="queues, workers, throughput and backfill checkpoints"
    )
    status.add_argument("--json", action="store_true")
    status.add_argument("--window", type=positive, default=5, metavar="MINUTES",
                        help="throughput over the last MINUTES (default 5)")
    status.set_defaults(run=cmd_status)

    dead = commands.add_parser("dead", help="inspect or replay dead-lettered jobs")
    dead.add_argument("action", choices=("list", "requeue", "purge"))
    dead.add_argument("--limit", type=positive, default=100, help="letters to list, oldest first")
    dead.set_defaults(run=cmd_dead)

    database = commands.add_parser("db", help="database schema")
    database.add_argument("action", choices=("upgrade",))
    database.set_defaults(run=cmd_db)

    demo = commands.add_parser(
        "demo", help="caption a folder end to end on a private Redis, SQLite and local files"
    )
    demo.add_argument("directory", nargs="?", type=Path, default=SAMPLES_DIR,
                      help="folder of images (default: the bundled sample photos)")
    demo.add_argument("--timeout", type=positive, default=600, help="seconds to wait")
    demo.set_defaults(run=cmd_demo)
    return parser


def add_backfill_parser(commands: argparse._SubParsersAction) -> None:
    backfill = commands.add_parser("backfill", help="caption every image under s3://bucket/prefix")
    backfill.add_argument("prefix", metavar="s3://bucket/prefix")
    backfill.add_argument("--queue", default=BULK_QUEUE, choices=WORK_QUEUES)
    backfill.add_argument("--batch-size", type=positive, default=32, help="images per job")
    backfill.add_argument(
        "--skip-existing", action=argparse.BooleanOptionalAction, default=True,
        help="skip images that already have a row for this model and prompt (default: on)",
    )
    backfill.add_argument("--dry-run", action="store_true", help="list and count, send nothing")
    backfill.add_argument("--limit", type=positive, help="enqueue at most N images")
    backfill.add_argument("--name", help="checkpoint name (default: the s3:// prefix)")
    backfill.add_argument("--resume", action="store_true",
                          help="continue after the checkpoint's last key (from the start if none)")
    backfill.add_argument(
        "--max-queue-depth", type=int, default=DEFAULT_MAX_QUEUE_DEPTH, metavar="IMAGES",
        help="pause listing while the queue holds more images than this; 0 = no limit "
        f"(default {DEFAULT_MAX_QUEUE_DEPTH:,}: ~10 MB of Redis, minutes of fleet work)",
    )
    backfill.add_argument("--since", type=since_date, metavar="DATE",
                          help="only objects modified at or after DATE (ISO 8601, UTC default)")
    backfill.add_argument("--match", metavar="GLOB",
                          help="only keys below the prefix matching GLOB, e.g. '2024-*/*.jpg'")
    backfill.add_argument("--rate", type=per_second, metavar="N/s",
                          help="enqueue at most N images per second")
    backfill.add_argument("--total", type=positive, metavar="OBJECTS",
                          help="objects expected under the prefix, for the progress ETA")
    backfill.set_defaults(run=cmd_backfill)


def add_listen_parser(commands: argparse._SubParsersAction) -> None:
    listen = commands.add_parser("listen", help="turn S3 upload events into realtime jobs")
    sources = listen.add_subparsers(required=True, metavar="SOURCE")
    sqs = sources.add_parser("sqs", help="long-poll an SQS queue fed by S3 event notifications")
    sqs.add_argument("--queue-url", required=True, metavar="URL")
    sqs.add_argument("--receivers", type=positive, default=2, help="parallel long polls")
    sqs.add_argument("--endpoint-url", help="SQS endpoint (default: AWS for the region)")
    webhook = sources.add_parser("webhook", help="HTTP endpoint for MinIO / Ceph RGW events")
    webhook.add_argument("--host", default="0.0.0.0")
    webhook.add_argument("--port", type=int, default=8080)
    webhook.add_argument("--max-body-bytes", type=positive, default=1024 * 1024)
    for parser_ in (sqs, webhook):
        parser_.add_argument("--queue", default=REALTIME_QUEUE, choices=WORK_QUEUES)
        parser_.add_argument("--batch-size", type=positive, default=32, help="images per job")
        parser_.add_argument("--linger-ms", type=int, default=50,
                             help="wait this long for more events to fill a job (default 50)")
        parser_.add_argument("--dedupe-ttl", type=positive, default=6 * 3600, metavar="SECONDS",
                             help="drop repeats of an event for this long (default 6 h)")
    sqs.set_defaults(run=cmd_listen_sqs)
    webhook.set_defaults(run=cmd_listen_webhook)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def since_date(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an ISO date like 2024-05-31: {exc}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def per_second(text: str) -> float:
    value = float(text.removesuffix("/s"))
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive rate such as 500/s")
    return value


def read_uris(args: argparse.Namespace) -> Iterator[str]:
    yield from args.uris
    if args.from_file:
        handle: TextIO = sys.stdin if args.from_file == "-" else open(args.from_file)  # noqa: SIM115
        with handle:
            for line in handle:
                if line.strip() and not line.lstrip().startswith("#"):
                    yield line.strip()


def cmd_enqueue(args: argparse.Namespace) -> int:
    from captioning.broker import create_app
    from producer.enqueue import JobSender, enqueue_uris

    settings = get_settings()
    if not args.uris and not args.from_file:
        raise ConfigError("give URIs as arguments or --from-file F (use - for stdin)")
    with JobSender(create_app(settings), args.queue) as sender:
        enqueue_uris(read_uris(args), sender, settings, batch_size=args.batch_size)
    print(f"enqueued {sender.images_sent} images in {sender.jobs_sent} jobs to {args.queue}")
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from captioning.broker import create_app, redis_client
    from captioning.checkpoints import Checkpoint, Checkpoints
    from captioning.storage import S3Store
    from captioning.uris import check_allowed, parse_prefix
    from producer.backfill import Filters, Pacing, backfill
    from producer.enqueue import JobSender
    from producer.pacing import QueueGate, RateLimiter
    from producer.progress import Progress

    settings = get_settings()
    source = parse_prefix(args.prefix)
    if source.scheme != "s3":
        raise ConfigError("backfill lists S3 prefixes: s3://bucket/prefix")
    check_allowed(source, settings)
    name = args.name or args.prefix
    broker = redis_client(settings.broker_url)
    checkpoints = Checkpoints(broker)
    checkpoint = Checkpoint(name=name, source=args.prefix)
    if args.resume:
        saved = checkpoints.get(name)
        if saved is not None and saved.source != args.prefix:
            raise ConfigError(
                f"backfill {name!r} was started for {saved.source}, not {args.prefix}: "
                "pass the same prefix, or another --name"
            )
        if saved is not None:
            log.info("resuming %s after key %r", name, saved.last_key)
            checkpoint = saved
            checkpoint.finished = False
        else:
            log.info("no checkpoint named %r: starting from the beginning", name)
    results = ResultsStore(settings.database_url) if args.skip_existing else None
    pacing = Pacing(rate=RateLimiter(args.rate) if args.rate else None)
    if args.max_queue_depth > 0:
        pacing.gate = QueueGate(
            broker, args.queue, max_images=args.max_queue_depth, images_per_job=args.batch_size
        )
    progress = Progress(checkpoint, total=args.total)
    paused = lambda: pacing.gate.paused_s if pacing.gate else 0.0  # noqa: E731

    def run(sender: JobSender | None) -> Checkpoint:
        return backfill(
            source, list_pages=S3Store(settings).list, results=results, sender=sender,
            settings=settings, batch_size=args.batch_size, checkpoint=checkpoint,
            checkpoints=checkpoints, pacing=pacing, limit=args.limit,
            filters=Filters(prefix=source.key, since=args.since, match=args.match),
            on_progress=lambda cp: progress.update(cp, paused()),
        )

    try:
        if args.dry_run:
            report = run(None)
        else:
            with JobSender(create_app(settings), args.queue) as sender:
                report = run(sender)
    finally:
        progress.close(checkpoint, paused())
    verb = "would enqueue" if args.dry_run else "enqueued"
    print(
        f"listed {report.listed} objects, {report.images} images; skipped {report.skipped} "
        f"already captioned; {verb} {report.enqueued} images in {report.jobs} jobs"
    )
    if not report.finished:
        print(f"stopped before the end: continue with --resume (checkpoint {name!r})")
    return 0


def cmd_listen_sqs(args: argparse.Namespace) -> int:
    import boto3

    from producer.listeners import SqsListener

    client = boto3.client("sqs", endpoint_url=args.endpoint_url)
    with event_batcher(args) as batcher:
        listener = SqsListener(client, args.queue_url, batcher, receivers=args.receivers)
        stop_on_signals(listener.stopping.set)
        listener.run()
    return 0


def cmd_listen_webhook(args: argparse.Namespace) -> int:
    from producer.listeners import WebhookServer

    secret = get_settings().webhook_secret
    if secret is None or not secret.get_secret_value():
        raise ConfigError(
            "set CAPTIONER_WEBHOOK_SECRET: senders must present it as "
            "'Authorization: Bearer <secret>' (MinIO auth_token) or 'X-Captioner-Secret'"
        )
    with event_batcher(args) as batcher:
        server = WebhookServer(
            (args.host, args.port), batcher, secret=secret.get_secret_value(),
            max_body_bytes=args.max_body_bytes,
        )
        stop_on_signals(lambda: threading.Thread(target=server.shutdown).start())
        log.info("webhook listening on %s:%d", args.host, server.server_address[1])
        with server:
            server.serve_forever()
    return 0


@contextmanager
def event_batcher(args: argparse.Namespace) -> Iterator[LingerBatcher]:
    """Sender, deduper and batcher for a listener; flushes what is waiting on the way out."""
    from captioning.broker import create_app, redis_client
    from producer.batcher import LingerBatcher
    from producer.dedupe import Deduper
    from producer.enqueue import JobSender
    from producer.listeners import EventEnqueuer

    settings = get_settings()
    deduper = Deduper(redis_client(settings.broker_url), ttl_s=args.dedupe_ttl)
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


def cmd_exporter(args: argparse.Namespace) -> int:
    from captioning.exporter import serve

    serve(get_settings().broker_url, args.port)
    print(f"serving queue metrics on :{args.port}/metrics")
    while True:
        time.sleep(3600)


def cmd_health(args: argparse.Namespace) -> int:
    import socket

    import redis

    from captioning.health import is_healthy, read_health

    client = redis.Redis.from_url(get_settings().broker_url, socket_timeout=3)
    try:
        health = read_health(client, socket.gethostname())
    except redis.RedisError as exc:
        print(f"unhealthy: broker unreachable ({type(exc).__name__})", file=sys.stderr)
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


def cmd_results(args: argparse.Namespace) -> int:
    rows = ResultsStore(get_settings().database_url).rows(
        prefix=args.prefix, status=args.status, limit=args.limit
    )
    write_rows(rows, args.format, sys.stdout)
    return 0


def write_rows(rows: Iterable[CaptionRow], fmt: str, out: TextIO) -> None:
    records = [row.to_json() for row in rows]
    if fmt == "jsonl":
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(CaptionRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(records)
    else:
        out.write(format_table(records))


def format_table(records: Sequence[dict[str, object]]) -> str:
    columns = ("status", "uri", "caption / error")
    cells = [
        (
            str(r["status"]),
            shorten(str(r["uri"]), 60, keep_end=True),
            shorten(str(r["caption"] if r["status"] == "ok" else r["error"]), 70),
        )
        for r in records
    ]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [columns, tuple("-" * w for w in widths), *cells]
    body = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)
    return f"{body}\n({len(records)} rows)\n"


def shorten(text: str, width: int, *, keep_end: bool = False) -> str:
    """Fit a cell: URIs keep their end (the file name), captions their beginning."""
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1) :] if keep_end else text[: width - 1] + "…"


def cmd_status(args: argparse.Namespace) -> int:
    from captioning.status import collect_status, format_status

    report = collect_status(get_settings(), window_s=args.window * 60)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_status(report))
    return 0


def cmd_dead(args: argparse.Namespace) -> int:
    from captioning.broker import create_app
    from captioning.deadletters import DeadLetter, DeadLetters
    from captioning.errors import InvalidJob
    from captioning.messages import CaptionJob
    from producer.enqueue import JobSender

    settings = get_settings()
    letters = DeadLetters(settings.broker_url)
    if args.action == "list":
        for letter in letters.list(args.limit):
            print(json.dumps(letter.__dict__, default=str))
        return 0
    if args.action == "purge":
        print(f"purged {letters.purge()} dead-lettered jobs")
        return 0
    app = create_app(settings)

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


def cmd_db(args: argparse.Namespace) -> int:
    ResultsStore(get_settings().database_url).create_schema()
    print("captions table is up to date")
    return 0


def choose_demo_model() -> str:
    """CAPTIONER_MODEL if set; else real BLIP-2 if already cached; else the tiny stand-in."""
    if os.environ.get("CAPTIONER_MODEL"):
        return os.environ["CAPTIONER_MODEL"]
    from workers.runtimes.loading import weights_cached

    return REAL_MODEL if weights_cached(REAL_MODEL) else TINY_MODEL


def cmd_demo(args: argparse.Namespace) -> int:
    from captioning.broker import create_app
    from captioning.embedded import PrivateRedis
    from captioning.uris import file_uri
    from producer.enqueue import JobSender, enqueue_uris
    from producer.keys import is_image_key

    directory = args.directory.resolve()
    images = sorted(p for p in directory.rglob("*") if p.is_file() and is_image_key(p.name))
    if not images:
        raise ConfigError(f"no images (.jpg, .png, .webp, ...) under {directory}")
    model = choose_demo_model()
    if model == TINY_MODEL:
        print(
            "note: using tiny-random-blip2, a BLIP-2 with random weights: its captions are "
            f"placeholder noise. For real captions, download {REAL_MODEL} into the Hugging Face "
            "cache (huggingface-cli download ...) or set CAPTIONER_MODEL to a local directory."
        )
    workdir = Path(os.environ.get("CAPTIONER_DEMO_DIR", Path.cwd() / ".captioner-demo"))
    workdir.mkdir(parents=True, exist_ok=True)
    database = workdir / "captions.db"
    database.unlink(missing_ok=True)
    with PrivateRedis() as broker:
        settings = Settings(
            broker_url=broker.url,
            database_url=f"sqlite:///{database}",
            allowed_roots=(directory,),
            model=model,
            results_uri=(workdir / "sidecars").as_uri(),
            metrics_port=0,
        )
        env = {**os.environ, **settings.as_env()}
        results = ResultsStore(settings.database_url)
        results.create_schema()
        worker = subprocess.Popen(
            [sys.executable, "-m", "captioning.cli", "worker", "--loglevel", "WARNING"], env=env
        )
        try:
            with JobSender(create_app(settings), REALTIME_QUEUE) as sender:
                enqueue_uris((file_uri(p) for p in images), sender, settings, batch_size=8)
            print(f"enqueued {len(images)} images from {directory}; waiting for the worker...")
            rows = wait_for_rows(results, len(images), args.timeout, worker)
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    write_rows(rows, "table", sys.stdout)
    print(f"results: {database} (sidecars in {workdir / 'sidecars'})")
    return 0 if len(rows) == len(images) else 1


def wait_for_rows(
    results: ResultsStore, expected: int, timeout: float, worker: subprocess.Popen[bytes]
) -> list[CaptionRow]:
    deadline = time.monotonic() + timeout
    while True:
        rows = results.rows()
        if len(rows) >= expected:
            return rows
        if worker.poll() is not None:
            raise ConfigError(f"the demo worker exited with code {worker.returncode}")
        if time.monotonic() > deadline:
            log.error("timed out: %d of %d images captioned", len(rows), expected)
            return rows
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
