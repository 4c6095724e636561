"""Soak: caption N images with 2 workers while faults hit on a schedule; count what is lost.

    python bench/soak.py                      # 5,000 images, tiny model, 2 workers
    python bench/soak.py --images 1000 --redis-restart

Everything runs on private services on 127.0.0.1 (redis-server, SeaweedFS, a PostgreSQL 15
cluster), started and broken here. Workers run with the default job limits, so the
visibility timeout is the default one (about 20 minutes): a whole worker's job can only come
back in time through the heartbeat. The faults, by progress through the run:

    every --kill-every s   SIGKILL one worker's pool process (the OOM killer)
    every --worker-kill-every s  SIGKILL the whole process group of a worker holding a job
                           (spot VM gone), then start it again; the time from the kill until
                           every image of the jobs it held has a row and the jobs are acked
                           is reported per kill
    at 20%                 object store down for --outage s, then back on the same port
    at 45%                 database stopped for 8 s, then started again
    at 80% (--redis-restart) Redis killed and started empty; the backfill is run again

Drained means every image has a row; when the queues are empty and rows are still missing
(the Redis restart lost queued jobs), the backfill is run again with skip-existing, as an
operator would. The summary line counts enqueued / ok / failed / missing / duplicated.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from captioning.keys import HEARTBEATS_KEY, UNACKED_KEY, held_key  # noqa: E402
from captioning.messages import CaptionJob  # noqa: E402
from captioning.queues import job_of  # noqa: E402
from captioning.results import ResultsStore, captions  # noqa: E402
from captioning.settings import Settings  # noqa: E402
from tests.faults import PrivatePostgres, RedisServer, Worker, wait_until  # noqa: E402
from tests.services import SeaweedS3  # noqa: E402

BUCKET = "photos"
PREFIX = "soak/"


@dataclass
class WorkerKill:
    """A whole worker killed while holding jobs, and when their images all had rows."""

    at: float
    tags: list[str]
    uris: list[str]
    #: Celery task ids: a retry is a new message (a new tag) of the same task.
    tasks: set[str]
    recovered_at: float | None = None

    @property
    def seconds(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.at


@dataclass
class Soak:
    args: argparse.Namespace
    workdir: Path
    redis: RedisServer
    s3: SeaweedS3
    db: PrivatePostgres
    workers: list[Worker] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    kills: list[WorkerKill] = field(default_factory=list)
    enqueued: int = 0
    #: Images missing when the queues ran empty, enqueued again by a backfill.
    found_by_backfill: int = 0
    starts: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "CAPTIONER_BROKER_URL": self.redis.url,
            "CAPTIONER_DATABASE_URL": self.db.url,
            "CAPTIONER_S3_ENDPOINT_URL": self.s3.endpoint,
            "CAPTIONER_ALLOWED_BUCKETS": f"{BUCKET},uploads",
            "CAPTIONER_RESULTS_URI": "s3://uploads/captions",
            "CAPTIONER_MODEL": "tiny-random-blip2",
            "CAPTIONER_BATCH_SIZE": "8",
            "CAPTIONER_MAX_NEW_TOKENS": "8",
        }

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {message}", flush=True)

    def fault(self, message: str) -> None:
        self.faults.append(message)
        self.log(f"FAULT {message}")

    def backfill(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "cli", "backfill", f"s3://{BUCKET}/{PREFIX}",
             "--batch-size", str(self.args.job_size)],
            env=self.env, capture_output=True, text=True, timeout=600, check=True,
        )
        line = done.stdout.strip().splitlines()[-1]
        self.enqueued += int(line.split("enqueued ")[1].split(" images")[0])
        self.log(line)

    def start_worker(self, index: int) -> None:
        self.starts += 1
        worker = Worker(self.env, self.workdir / f"worker-{index}-{self.starts}.log")
        if index < len(self.workers):
            self.workers[index] = worker
        else:
            self.workers.append(worker)
        worker.start()


def held_by(soak: Soak, worker: Worker) -> list[str]:
    """Delivery tags the worker's main process holds, from its heartbeat entry."""
    client = soak.redis.client()
    for member in client.zrange(HEARTBEATS_KEY, 0, -1):
        worker_id = member.decode()
        if worker_id.split(":")[1] == str(worker.pid):
            return [tag.decode() for tag in client.smembers(held_key(worker_id))]
    return []


def held_jobs(soak: Soak, tags: list[str]) -> tuple[list[str], set[str]]:
    """The URIs and task ids of the reserved messages `tags`."""
    client = soak.redis.client()
    uris, tasks = [], set()
    for raw in client.hmget(UNACKED_KEY, tags):
        message = json.loads(raw)[0] if raw else None
        job = job_of(json.dumps(message)) if message else None
        if job is not None:  # either wire form, as a worker reads it
            uris += [item.uri for item in CaptionJob.from_message(job).items]
            tasks.add(message["headers"]["id"])
    return uris, tasks


def kill_whole_worker(soak: Soak) -> None:
    """SIGKILL the process group of a worker that holds a job, then start it again."""
    holding = [(index, held_by(soak, worker)) for index, worker in enumerate(soak.workers)]
    holding = [(index, tags) for index, tags in holding if tags]
    if not holding:
        return
    index, tags = random.choice(holding)
    uris, tasks = held_jobs(soak, tags)
    worker = soak.workers[index]
    os.killpg(worker.pid, signal.SIGKILL)
    soak.kills.append(WorkerKill(time.monotonic(), tags, uris, tasks))
    worker.process.wait(timeout=30)
    soak.fault(f"whole worker {index} SIGKILLed holding {len(tags)} job(s) of {len(uris)} "
               "images (spot VM gone), then started again")
    soak.start_worker(index)


def watch_kills(soak: Soak, results: ResultsStore, stop: threading.Event) -> None:
    """Stamp each kill when all its images have rows and its jobs left `unacked`."""
    while not stop.wait(0.25):
        for kill in soak.kills:
            if kill.recovered_at is not None:
                continue
            try:
                with results.engine.connect() as conn:
                    found = conn.execute(select(func.count(captions.c.uri.distinct())).where(
                        captions.c.uri.in_(kill.uris))).scalar_one()
                acked = not any(soak.redis.client().hmget(UNACKED_KEY, kill.tags))
            except Exception:
                continue
            if found == len(set(kill.uris)) and acked:
                kill.recovered_at = time.monotonic()
                soak.log(f"kill recovered: rows and ack {kill.seconds:.1f} s after the kill")


def make_images(count: int, seed: int = 7) -> list[bytes]:
    """Small, distinct JPEGs: a few coloured blocks each, so every decode is real work."""
    rng = random.Random(seed)
    images = []
    for _ in range(count):
        image = Image.new("RGB", (96, 72), tuple(rng.randrange(256) for _ in range(3)))
        for _ in range(4):
            x, y = rng.randrange(80), rng.randrange(56)
            image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 16, y + 16))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        images.append(out.getvalue())
    return images


def upload(s3: SeaweedS3, images: list[bytes]) -> None:
    client = s3.client()
    for bucket in (BUCKET, "uploads"):
        client.create_bucket(Bucket=bucket)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: client.put_object(
            Bucket=BUCKET, Key=f"{PREFIX}{item[0]:06d}.jpg", Body=item[1]), enumerate(images)))


def counts(results: ResultsStore) -> tuple[int, int, int, int, int]:
    """(rows, distinct uris, ok, failed, written more than once) under the soak prefix."""
    under = captions.c.uri.startswith(f"s3://{BUCKET}/{PREFIX}")
    query = select(
        func.count(), func.count(captions.c.uri.distinct()),
        func.count().filter(captions.c.status == "ok"),
        func.count().filter(captions.c.status == "failed"),
        func.count().filter(captions.c.attempts > 1),
    ).where(under)
    while True:
        try:
            with results.engine.connect() as conn:
                rows, distinct, ok, failed, again = conn.execute(query).one()
                return int(rows), int(distinct), int(ok), int(failed), int(again)
        except Exception:  # the database may be the fault being injected right now
            time.sleep(1)


def queues_idle(soak: Soak) -> bool:
    client = soak.redis.client()
    try:
        return sum(client.llen(q) for q in ("captions.realtime", "captions.bulk")) == 0 and \
            client.hlen("unacked") == 0
    except Exception:
        return False


def run(soak: Soak, results: ResultsStore, total: int) -> None:
    args = soak.args
    schedule = [(0.20, "s3"), (0.45, "db")]
    if args.redis_restart:
        schedule.append((0.80, "redis"))
    next_kill = time.monotonic() + args.kill_every
    next_worker_kill = time.monotonic() + args.worker_kill_every
    idle_since: float | None = None
    deadline = time.monotonic() + args.timeout
    while True:
        _, distinct, *_ = counts(results)
        if distinct >= total:
            return
        if time.monotonic() > deadline:
            soak.log("timed out")
            return
        progress = distinct / total
        if schedule and progress >= schedule[0][0]:
            inject(soak, schedule.pop(0)[1], args)
            continue
        if time.monotonic() >= next_kill:
            victim = random.randrange(len(soak.workers))
            if soak.workers[victim].kill_pool():
                soak.fault(f"SIGKILL pool process of worker {victim} ({distinct}/{total} done)")
            next_kill = time.monotonic() + args.kill_every
        if time.monotonic() >= next_worker_kill:
            kill_whole_worker(soak)
            next_worker_kill = time.monotonic() + args.worker_kill_every
        if queues_idle(soak):
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 15:
                soak.log(f"queues empty with {total - distinct} images missing: backfill again")
                soak.found_by_backfill += total - distinct
                soak.backfill()
                idle_since = None
        else:
            idle_since = None
        time.sleep(1)


def inject(soak: Soak, fault: str, args: argparse.Namespace) -> None:
    if fault == "s3":
        soak.fault(f"object store down for {args.outage:.0f} s")
        soak.s3.stop()
        time.sleep(args.outage)
        soak.s3.start()
        soak.log("object store back")
    elif fault == "db":
        soak.fault("database stopped for 8 s")
        soak.db.stop()
        time.sleep(8)
        soak.db.start()
        soak.log("database back")
    elif fault == "redis":
        soak.fault("Redis killed and started empty")
        soak.redis.kill()
        time.sleep(2)
        soak.redis.start()


def settings_of(env: dict[str, str]) -> dict[str, str]:
    return {name.removeprefix("CAPTIONER_").lower(): value for name, value in env.items()
            if name.startswith("CAPTIONER_")}


def report_kills(kills: list[WorkerKill], settings: Settings) -> None:
    print(f"\nwhole-worker kills: {len(kills)} (heartbeat TTL {settings.heartbeat_ttl_s} s, "
          f"visibility timeout {settings.visibility_timeout_s} s)")
    print(f"{'kill':>4} {'jobs':>5} {'images':>7} {'kill to rows (s)':>17}  "
          "same job killed again in")
    once = []
    for number, kill in enumerate(kills, 1):
        took = "never" if kill.seconds is None else f"{kill.seconds:.1f}"
        again = [str(later) for later, other in enumerate(kills, 1)
                 if later > number and kill.tasks & other.tasks]
        print(f"{number:>4} {len(kill.tags):>5} {len(kill.uris):>7} {took:>17}  "
              f"{', '.join(again) or '-'}")
        if not again and kill.seconds is not None:
            once.append(kill.seconds)
    times = [kill.seconds for kill in kills if kill.seconds is not None]
    if times:
        median = sorted(times)[len(times) // 2]
        print(f"longest kill to rows: {max(times):.1f} s; median {median:.1f} s")
    if once:
        print(f"longest kill to rows of jobs no later kill hit: {max(once):.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--job-size", type=int, default=16, help="images per job")
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between kills")
    parser.add_argument("--worker-kill-every", type=float, default=60.0,
                        help="seconds between whole-worker kills")
    parser.add_argument("--outage", type=float, default=20.0, help="object store outage, s")
    parser.add_argument("--redis-restart", action="store_true", help="also restart Redis")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    for name, value in (("AWS_ACCESS_KEY_ID", "soak"), ("AWS_SECRET_ACCESS_KEY", "soak"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)

    workdir = Path(tempfile.mkdtemp(prefix="captioner-soak-"))
    soak = Soak(args, workdir, RedisServer(workdir / "redis"), SeaweedS3(workdir / "s3"),
                PrivatePostgres())
    results = ResultsStore(soak.db.url)
    try:
        soak.redis.start()
        soak.s3.start()
        soak.db.init().start()
        results.create_schema()
        soak.log(f"uploading {args.images} images")
        upload(soak.s3, make_images(args.images))
        for index in range(args.workers):
            soak.start_worker(index)
        soak.started = time.monotonic()
        soak.backfill()
        stop = threading.Event()
        watcher = threading.Thread(target=watch_kills, args=(soak, results, stop), daemon=True)
        watcher.start()
        run(soak, results, args.images)
        drained = time.monotonic() - soak.started
        wait_until(lambda: queues_idle(soak), 120, "the queues to empty")
        time.sleep(3)  # let redelivered duplicates land, so they are counted
        rows, distinct, ok, failed, again = counts(results)
        print(f"\nfaults injected: {len(soak.faults)}")
        for fault in soak.faults:
            print(f"  - {fault}")
        print(
            f"images {args.images}  enqueued {soak.enqueued}  ok {ok}  failed {failed}  "
            f"missing {args.images - distinct}  duplicated {rows - distinct}  "
            f"drained in {drained:.0f} s ({args.images / drained:.1f} images/s)"
        )
        print(f"rows written more than once (captioned again after a fault): {again}")
        print(f"images whose jobs Redis lost, found again by a backfill: {soak.found_by_backfill}")
        stop.set()
        watcher.join()
        report_kills(soak.kills, Settings(**settings_of(soak.env)))
        recovered = all(kill.seconds is not None for kill in soak.kills)
        return 0 if distinct == args.images and rows == distinct and recovered else 1
    finally:
        for worker in soak.workers:
            worker.kill_all()
        results.dispose()
        soak.s3.stop()
        soak.db.destroy()
        soak.redis.kill()


if __name__ == "__main__":
    sys.exit(main())
