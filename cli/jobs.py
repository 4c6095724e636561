"""`captioner enqueue` and `captioner backfill`: URIs and S3 listings become jobs."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from captioning.errors import ConfigError
from captioning.kinds import KINDS
from captioning.messages import (
    BULK_QUEUE,
    MAX_PROMPT_CHARS,
    MAX_PROMPTS_PER_JOB,
    REALTIME_QUEUE,
    WORK_QUEUES,
)
from captioning.results import ResultsStore
from captioning.settings import Settings, get_settings
from cli.arguments import comma_list, kind_list, per_second, positive, since_date

if TYPE_CHECKING:
    import redis

    from captioning.checkpoints import Checkpoint, Checkpoints
    from captioning.uris import ImageLocation
    from producer.backfill import Pacing

log = logging.getLogger("captioner")

DEFAULT_MAX_QUEUE_DEPTH = 100_000


def add_parsers(commands: argparse._SubParsersAction) -> None:
    enqueue = commands.add_parser("enqueue", help="send image URIs to the workers")
    enqueue.add_argument("uris", nargs="*", metavar="URI", help="s3://bucket/key or file:///path")
    enqueue.add_argument("--from-file", metavar="F", help="read URIs, one per line ('-' = stdin)")
    enqueue.add_argument("--queue", default=REALTIME_QUEUE, choices=WORK_QUEUES,
                         help="queue to send to (default %(default)s, served first)")
    enqueue.add_argument("--batch-size", type=positive, default=32, help="images per job")
    add_kind_argument(enqueue)
    add_prompt_argument(enqueue)
    enqueue.set_defaults(run=cmd_enqueue)

    backfill = commands.add_parser("backfill", help="caption every image under s3://bucket/prefix")
    backfill.add_argument("prefix", metavar="s3://bucket/prefix", nargs="?",
                          help="list every image key under this prefix "
                          "(with --inventory: only keys under it)")
    backfill.add_argument("--inventory", metavar="s3://…/manifest.json",
                          help="read the keys from an S3 Inventory report (CSV or Parquet)")
    backfill.add_argument("--list-workers", type=positive, default=1, metavar="N",
                          help="list N parts at once: the sub-prefixes one '/' below the "
                          "prefix, the --split prefixes, or the inventory's files")
    backfill.add_argument("--split", type=comma_list, default=(), metavar="A/,B/,…",
                          help="list these sub-prefixes of the prefix as the parts")
    backfill.add_argument("--queue", default=BULK_QUEUE, choices=WORK_QUEUES,
                          help="queue to send to (default %(default)s, after uploads)")
    backfill.add_argument("--batch-size", type=positive, default=32, help="images per job")
    add_kind_argument(backfill)
    backfill.add_argument(
        "--skip-existing", action=argparse.BooleanOptionalAction, default=True,
        help="ask each image only for the kinds it has no row for yet (that kind's model, and "
        "every prompt where the kind reads them) (default: on)",
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
    add_prompt_argument(backfill)
    backfill.set_defaults(run=cmd_backfill)


def add_prompt_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt", action="append", dest="prompts", metavar="TEXT",
        help="caption with this prompt; repeat for several (one row each, one fetch and "
        f"vision pass per image; at most {MAX_PROMPTS_PER_JOB}). Default: CAPTIONER_PROMPT",
    )


def job_prompts(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The --prompt values, checked here so a bad list is a usage error, not a dead job."""
    if not args.prompts:
        return None
    prompts = tuple(args.prompts)
    if len(set(prompts)) != len(prompts) or len(prompts) > MAX_PROMPTS_PER_JOB:
        raise ConfigError(f"--prompt: give up to {MAX_PROMPTS_PER_JOB} different prompts")
    if any(len(prompt) > MAX_PROMPT_CHARS for prompt in prompts):
        raise ConfigError(f"--prompt: at most {MAX_PROMPT_CHARS} characters each")
    return prompts


def add_kind_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kind", type=kind_list, metavar="KIND[,KIND...]",
        help=f"what to produce for each image: {', '.join(KINDS)} "
        "(default: CAPTIONER_KINDS); each kind's model comes from its setting",
    )


@contextmanager
def uri_file(path: str | None) -> Iterator[Iterable[str]]:
    """The lines of --from-file (stdin for '-'), opened before anything is sent."""
    if path is None:
        yield ()
        return
    try:
        handle: TextIO = sys.stdin if path == "-" else open(path)  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(
            f"cannot read --from-file {path} ({exc.strerror}): give a readable file of URIs"
        ) from exc
    with handle:
        yield handle


def read_uris(uris: Iterable[str], lines: Iterable[str], path: str | None) -> Iterator[str]:
    """The URIs given as arguments, then the file's, without blank lines and # comments."""
    for uri in uris:
        yield text(uri, f"the argument {uri!r}")
    try:
        for line in lines:
            if line.strip() and not line.lstrip().startswith("#"):
                yield text(line.strip(), f"--from-file {path}")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read --from-file {path} ({exc}): give a text file of URIs, one per line"
        ) from exc


def text(uri: str, origin: str) -> str:
    """Bytes that are not UTF-8 reach us as surrogates (argv, stdin): refuse them here."""
    try:
        uri.encode()
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{origin} is not UTF-8 text: give URIs as UTF-8") from exc
    return uri


def cmd_enqueue(args: argparse.Namespace) -> int:
    from captioning.broker import create_app
    from producer.enqueue import PUBLISH_BATCH, JobSender, enqueue_uris

    settings = get_settings()
    if not args.uris and not args.from_file:
        raise ConfigError("give URIs as arguments or --from-file F (use - for stdin)")
    app = create_app(settings, one_shot=True)
    with (uri_file(args.from_file) as lines,
          JobSender(app, args.queue, batch=PUBLISH_BATCH) as sender):
        uris = read_uris(args.uris, lines, args.from_file)
        enqueue_uris(
            uris, sender, settings, batch_size=args.batch_size, kinds=args.kind,
            prompts=job_prompts(args),
        )
    print(f"enqueued {sender.images_sent} images in {sender.jobs_sent} jobs to {args.queue}")
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from captioning.broker import create_app
    from captioning.checkpoints import Checkpoint, Checkpoints
    from captioning.connections import redis_client
    from captioning.storage import S3Store
    from captioning.uris import check_allowed
    from producer.backfill import Filters, backfill
    from producer.enqueue import PUBLISH_BATCH, JobSender
    from producer.listing import pipelined
    from producer.progress import Progress

    settings, prompts = get_settings(), job_prompts(args)  # a bad --prompt fails first
    source = backfill_source(args)
    name = args.name or args.prefix or args.inventory
    origin = args.inventory or args.prefix
    broker = redis_client(settings.broker_url)
    checkpoints = Checkpoints(broker)
    checkpoint = Checkpoint(name=name, source=origin)
    in_parts = bool(args.inventory or args.split or args.list_workers > 1)
    if in_parts and args.limit:
        raise ConfigError("--limit works on one listing stream: drop --list-workers, --split "
                          "and --inventory, or drop --limit")
    if args.resume and not in_parts:
        checkpoint = resumed(checkpoints, checkpoint)
    results = ResultsStore(settings.database_url) if args.skip_existing else None
    pacing = backfill_pacing(args, broker)
    progress = Progress(checkpoint, total=args.total)
    paused = lambda: pacing.gate.paused_s if pacing.gate else 0.0  # noqa: E731
    options = {
        "results": results, "settings": settings, "batch_size": args.batch_size,
        "pacing": pacing, "on_progress": lambda cp: progress.update(cp, paused()),
        "kinds": args.kind, "prompts": prompts,
    }

    def run(sender: JobSender | None) -> Checkpoint:
        check_allowed(source, settings)
        return backfill(
            source, list_pages=pipelined(S3Store(settings).list), sender=sender,
            checkpoint=checkpoint, checkpoints=checkpoints, limit=args.limit,
            filters=Filters(prefix=source.key, since=args.since, match=args.match), **options,
        )

    try:
        if in_parts:
            report = run_in_parts(args, settings, options, checkpoints=checkpoints, name=name,
                                  origin=origin)
            checkpoint = report
        elif args.dry_run:
            report = run(None)
        else:
            app = create_app(settings, one_shot=True)
            with JobSender(app, args.queue, batch=PUBLISH_BATCH) as sender:
                report = run(sender)
    except BaseException:
        if checkpoint.enqueued:  # where a run that got going stopped; nothing to say otherwise
            progress.close(checkpoint, paused())
        raise
    progress.close(checkpoint, paused())
    verb = "would enqueue" if args.dry_run else "enqueued"
    print(
        f"listed {report.listed} objects, {report.images} images; skipped {report.skipped} "
        f"already captioned; {verb} {report.enqueued} images in {report.jobs} jobs"
    )
    if not report.finished:
        print(f"stopped before the end: continue with --resume (checkpoint {name!r})")
    return 0


def backfill_source(args: argparse.Namespace) -> ImageLocation:
    """What a backfill reads: the listed prefix, or the inventory manifest."""
    from captioning.uris import parse_prefix

    if not args.prefix and not args.inventory:
        raise ConfigError("give s3://bucket/prefix to list, or --inventory s3://…/manifest.json")
    source = parse_prefix(args.prefix or args.inventory)
    if source.scheme != "s3":
        raise ConfigError("backfill lists S3 prefixes: s3://bucket/prefix")
    return source


def backfill_pacing(args: argparse.Namespace, broker: redis.Redis) -> Pacing:
    """The queue-depth gate and rate limit every part of a backfill shares."""
    from producer.backfill import Pacing
    from producer.pacing import QueueGate, RateLimiter

    pacing = Pacing(rate=RateLimiter(args.rate) if args.rate else None)
    if args.max_queue_depth > 0:
        pacing.gate = QueueGate(
            broker, args.queue, max_images=args.max_queue_depth, images_per_job=args.batch_size
        )
    return pacing


def resumed(checkpoints: Checkpoints, fresh: Checkpoint) -> Checkpoint:
    """The saved checkpoint of this backfill's name, or `fresh` if there is none."""
    saved = checkpoints.get(fresh.name)
    if saved is None:
        log.info("no checkpoint named %r: starting from the beginning", fresh.name)
        return fresh
    if saved.source != fresh.source:
        raise ConfigError(
            f"backfill {fresh.name!r} was started for {saved.source}, not {fresh.source}: "
            "pass the same prefix, or another --name"
        )
    log.info("resuming %s after key %r", fresh.name, saved.last_key)
    saved.finished = False
    return saved


def run_in_parts(
    args: argparse.Namespace,
    settings: Settings,
    options: dict[str, Any],
    *,
    checkpoints: Checkpoints,
    name: str,
    origin: str,
) -> Checkpoint:
    """Sub-prefixes or inventory files as parts, `--list-workers` at a time."""
    from captioning.broker import create_app
    from captioning.storage import S3Store
    from captioning.uris import check_allowed, parse_prefix
    from producer.backfill import Filters
    from producer.inventory import read_manifest
    from producer.listing import backfill_parts, inventory_parts, prefix_parts

    store = S3Store(settings)
    if args.inventory:
        manifest = read_manifest(store, parse_prefix(args.inventory))
        under = parse_prefix(args.prefix) if args.prefix else None
        if under is not None and under.bucket != manifest.source_bucket:
            raise ConfigError(f"the inventory lists bucket {manifest.source_bucket!r}, "
                              f"not {under.bucket!r}")
        prefix = under.key if under else ""
        parts = inventory_parts(store, manifest, prefix)
        log.info("inventory of s3://%s: %d files", manifest.source_bucket, len(parts))
    else:
        source = parse_prefix(args.prefix)
        prefix = source.key
        parts = prefix_parts(store, source, args.split)
        log.info("listing %s in %d parts, %d at a time", args.prefix, len(parts),
                 args.list_workers)
    if parts:
        check_allowed(parts[0].source, settings)  # every part lists the same bucket
    return backfill_parts(
        parts, app=None if args.dry_run else create_app(settings, one_shot=True),
        queue_name=args.queue,
        name=name, source=origin, workers=args.list_workers, resume=args.resume,
        checkpoints=None if args.dry_run else checkpoints,
        filters=Filters(prefix=prefix, since=args.since, match=args.match), **options,
    )
