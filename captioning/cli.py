"""The `captioner` command: the one place that knows both producers and workers."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from captioning.errors import CaptionerError, ConfigError
from captioning.messages import BULK_QUEUE, REALTIME_QUEUE, WORK_QUEUES
from captioning.results import CaptionRow, ResultsStore
from captioning.settings import Settings, get_settings

log = logging.getLogger("captioner")

SAMPLES_DIR = Path(__file__).parent / "samples"
TINY_MODEL = "tiny-random-blip2"
REAL_MODEL = "Salesforce/blip2-opt-2.7b"
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
    backfill.set_defaults(run=cmd_backfill)

    worker = commands.add_parser("worker", help="run a captioning worker (one per GPU)")
    worker.add_argument("--queues", default=",".join(WORK_QUEUES),
                        help="queues to consume, first served first")
    worker.add_argument("--concurrency", type=positive, default=1,
                        help="pool processes, each loading the model (default 1)")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(run=cmd_worker)

    results = commands.add_parser("results", help="print caption rows")
    results.add_argument("--format", choices=("table", "jsonl", "csv"), default="table")
    results.add_argument("--prefix", help="only URIs starting with this, e.g. s3://bucket/dir/")
    results.add_argument("--status", choices=("ok", "failed"))
    results.add_argument("--limit", type=positive)
    results.set_defaults(run=cmd_results)

    status = commands.add_parser("status", help="queue depths and result counts")
    status.add_argument("--json", action="store_true")
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


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
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
    from tqdm import tqdm

    from captioning.broker import create_app
    from captioning.storage import S3Store
    from captioning.uris import check_allowed, parse_prefix
    from producer.backfill import BackfillReport, backfill
    from producer.enqueue import JobSender

    settings = get_settings()
    source = parse_prefix(args.prefix)
    if source.scheme != "s3":
        raise ConfigError("backfill lists S3 prefixes: s3://bucket/prefix")
    check_allowed(source, settings)
    results = ResultsStore(settings.database_url) if args.skip_existing else None
    bar = tqdm(unit=" images", desc="enqueued", disable=None, dynamic_ncols=True)

    def progress(report: BackfillReport) -> None:
        bar.update(report.enqueued - bar.n)
        bar.set_postfix(listed=report.listed, skipped=report.skipped, refresh=False)

    def run(sender: JobSender | None) -> BackfillReport:
        return backfill(
            source, store=S3Store(settings), results=results, sender=sender, settings=settings,
            batch_size=args.batch_size, limit=args.limit, on_progress=progress,
        )

    if args.dry_run:
        report = run(None)
    else:
        with JobSender(create_app(settings), args.queue) as sender:
            report = run(sender)
    progress(report)
    bar.close()
    verb = "would enqueue" if args.dry_run else "enqueued"
    print(
        f"listed {report.listed} objects, {report.images} images; skipped {report.skipped} "
        f"already captioned; {verb} {report.enqueued} images in {report.jobs} jobs"
    )
    if args.dry_run:
        for uri in report.sample:
            print(f"  {uri}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.app import app

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    app.worker_main(
        [
            "worker",
            "--queues", ",".join(queues),
            "--concurrency", str(args.concurrency),
            "--loglevel", args.loglevel,
            "--hostname", "captioner@%h",
            "--without-gossip", "--without-mingle",
        ]
    )
    return 0


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
    from captioning.queues import queue_stats

    settings = get_settings()
    queues = queue_stats(settings.broker_url)
    report = {
        "queues": {name: stats.__dict__ for name, stats in queues.items()},
        "results": ResultsStore(settings.database_url).status_counts(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'queue':<20} {'jobs':>8} {'images':>8} {'oldest (s)':>11}")
    for name, stats in queues.items():
        print(f"{name:<20} {stats.jobs:>8} {stats.images:>8} {stats.oldest_age_s:>11.1f}")
    counts = report["results"]
    print(f"rows: {counts.get('ok', 0)} ok, {counts.get('failed', 0)} failed")
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
    from workers.model import weights_cached

    return REAL_MODEL if weights_cached(REAL_MODEL) else TINY_MODEL


def cmd_demo(args: argparse.Namespace) -> int:
    from captioning.broker import create_app
    from captioning.embedded import PrivateRedis
    from captioning.uris import file_uri
    from producer.backfill import is_image_key
    from producer.enqueue import JobSender, enqueue_uris

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
        )
        env = {
            **os.environ,
            "CAPTIONER_BROKER_URL": settings.broker_url,
            "CAPTIONER_DATABASE_URL": settings.database_url,
            "CAPTIONER_ALLOWED_ROOTS": str(directory),
            "CAPTIONER_MODEL": model,
            "CAPTIONER_RESULTS_URI": str(settings.results_uri),
        }
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
