"""The interrogate kind on the CPU, side by side in one run.

terms  Per image: a fast-mode prompt from the cached term embeddings (CLIP image embedding +
       ranking + prompt) vs recomputing the term embeddings for the image (what running the
       original per image costs: it encodes its tables per run). In-process, batch 1, on
       the sample photos, for the tiny twin and a small-scale CLIP (4 layers, 256 wide,
       224 px / 32 px patches), both random and built here. The BLIP-2 caption is the same
       in both and left out. Recomputing is measured on a slice of --terms terms (every
       list thinned alike); the full lists' cost is that rate times 111,866 (extrapolated,
       labelled so) and the cached side is measured against a full-size table.
start  The term table at worker start: encoded and written (cache miss) vs read (hit).
kinds  Caption + tags + prompt for every image: one job asking for the three kinds vs three
       jobs of one kind each (tiny BLIP-2, WD14 and CLIP twins, the shipped term lists,
       0.5-megapixel JPEGs). In-process: process_job + the results write on file:// images,
       the three jobs on three workers that each serve only their kind (what separate tools
       are); images per wall-clock second and per CPU-second of the process.
cli    The same through the CLI: `captioner worker` serving the three kinds in a fresh
       process, fed through Redis from SeaweedFS, rows in PostgreSQL, from the first enqueue
       to the last row; and its start-up to ready with the term cache missing vs present.

    .venv/bin/python -m bench.interrogate [terms|kinds|cli|all] [--terms 1024] [--images 10]
        [--kind-images 48] [--rounds 2] [--term-cache DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import torch

from bench.photos import jpegs, sample_images
from captioning.broker import create_app
from captioning.embedded import PrivateRedis
from captioning.kinds import annotators
from captioning.messages import BULK_QUEUE, CaptionJob, JobItem
from captioning.results import ResultsStore
from captioning.settings import Settings
from producer.enqueue import JobSender, enqueue_uris
from tests.services import SeaweedS3
from workers.context import WorkerContext
from workers.interrogate.ranking import TermTable, fast_prompt, rank_terms
from workers.interrogate.term_cache import encode_terms, term_table
from workers.interrogate.terms import TermLists, load_term_lists
from workers.pixels import ModelPixels
from workers.runtimes.clip import ClipRuntime
from workers.runtimes.interrogate import Interrogator
from workers.runtimes.tiny import TINY_CLIP, TINY_MODEL, TINY_TAGGER, build_tiny_clip
from workers.tasks import process_job

CAPTION = "a photo"  # stands in for the BLIP-2 caption, the same on both sides
COUNT = Settings().interrogate_terms
SIZES = {
    "tiny": {},
    "small": {"width": 256, "layers": 4, "image_size": 224, "patch_size": 32},
}


@dataclass(frozen=True)
class TermsRow:
    model: str
    terms: int
    cached_s: float
    recompute_s: float
    cold_start_s: float
    warm_start_s: float
    full_cached_s: float
    full_recompute_s: float


def interrogator(clip: ClipRuntime, table: TermTable) -> Interrogator:
    return Interrogator(name=clip.name, clip=clip, table=table, count=COUNT, batch_size=1)


def thinned(terms: TermLists, total: int) -> TermLists:
    """Every list cut to the same share, so the slice has about `total` terms."""
    step = max(1, len(terms) // total)
    return TermLists({name: listed[::step] for name, listed in terms.lists.items()})


def per_image(run: Callable[[ModelPixels], object], pixels: list[ModelPixels]) -> float:
    """Median seconds of `run` over the images, one image at a time."""
    for _ in range(3):  # warm-up: the first calls of a shape build its kernels
        run(pixels[0])
    times = []
    for image in pixels:
        start = time.perf_counter()
        run(image)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, directory: Path, full: TermLists, total: int, images: int) -> TermsRow:
    clip = ClipRuntime.load(Settings(clip_model=str(directory), device="cpu"))
    terms = thinned(full, total)
    photos = sample_images()
    pixels = [clip.to_pixels(photos[i % len(photos)]) for i in range(images)]
    with tempfile.TemporaryDirectory(prefix="bench-terms-") as cache:
        start = time.perf_counter()
        table = term_table(clip, terms, Path(cache))
        cold = time.perf_counter() - start
        start = time.perf_counter()
        term_table(clip, terms, Path(cache))
        warm = time.perf_counter() - start
    cached = interrogator(clip, table)

    def recompute(image: ModelPixels) -> object:
        fresh = TermTable(terms, encode_terms(clip, terms).float())
        ranked = rank_terms(clip.image_embeddings([image]), fresh, COUNT)
        return fast_prompt(CAPTION, ranked[0], clip.fits)

    cached_s = per_image(lambda image: cached.interrogate([CAPTION], [image]), pixels)
    recompute_s = per_image(recompute, pixels[: max(2, images // 3)])
    # The cached side at full size: ranking costs the same whatever the rows hold.
    dim = table.embeddings.shape[1]
    stand_in = torch.nn.functional.normalize(torch.randn(len(full), dim)).half()
    full_table = interrogator(clip, TermTable(full, stand_in))
    full_cached_s = per_image(lambda image: full_table.interrogate([CAPTION], [image]), pixels)
    encode_rate = len(terms) / (recompute_s - cached_s)
    return TermsRow(
        model=name, terms=len(terms), cached_s=cached_s, recompute_s=recompute_s,
        cold_start_s=cold, warm_start_s=warm, full_cached_s=full_cached_s,
        full_recompute_s=full_cached_s + len(full) / encode_rate,
    )


def report_terms(rows: list[TermsRow], full: int) -> None:
    print("\nper image, in-process, batch 1 (median s; caption excluded)")
    print(f"{'model':<6} {'terms':>8} {'cached':>9} {'recompute':>10} {'ratio':>8}")
    for row in rows:
        print(f"{row.model:<6} {row.terms:>8,} {row.cached_s:>9.4f} {row.recompute_s:>10.3f} "
              f"{row.recompute_s / row.cached_s:>7.0f}x")
    for row in rows:
        print(f"{row.model:<6} {full:>8,} {row.full_cached_s:>9.4f} "
              f"{row.full_recompute_s:>9.1f}* {row.full_recompute_s / row.full_cached_s:>7.0f}x")
    print("* extrapolated: the measured encode rate times the full lists")
    print("\nterm table at start, in-process (s)")
    print(f"{'model':<6} {'terms':>8} {'miss':>9} {'hit':>9}")
    for row in rows:
        print(f"{row.model:<6} {row.terms:>8,} {row.cold_start_s:>9.3f} {row.warm_start_s:>9.4f}")


KINDS = ("caption", "tags", "interrogate")
APART = (("caption",), ("tags",), ("interrogate",))


def kind_settings(**fields: object) -> Settings:
    return Settings(model=TINY_MODEL, tagger_model=TINY_TAGGER, clip_model=TINY_CLIP,
                    device="cpu", max_new_tokens=20, metrics_port=0, **fields)


def in_process_kinds(files: list[bytes], job_size: int, rounds: int, cache: Path,
                     ) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(one job, three jobs) per round, alternating: images per wall-clock second, and
    images per CPU-second of this process (all its threads), which other jobs on a shared
    machine disturb far less."""
    with tempfile.TemporaryDirectory(prefix="bench-kinds-") as tmp:
        root = Path(tmp).resolve()
        uris = []
        for i, data in enumerate(files):
            (root / f"{i:04d}.jpg").write_bytes(data)
            uris.append((root / f"{i:04d}.jpg").as_uri())
        base = kind_settings(database_url=f"sqlite:///{root / 'rows.db'}",
                             allowed_roots=(root,), term_cache_dir=cache)
        ResultsStore(base.database_url).create_schema()
        together = WorkerContext.create(base.model_copy(update={"kinds": KINDS}))
        apart = {kinds: WorkerContext.create(base.model_copy(update={"kinds": kinds}))
                 for kinds in APART}

        def run(plan: list[tuple[WorkerContext, tuple[str, ...]]], count: int,
                ) -> tuple[float, float]:
            start, cpu = time.perf_counter(), time.process_time()
            for first in range(0, count, job_size):
                chunk = uris[first : min(first + job_size, count)]
                items = tuple(JobItem(uri=uri) for uri in chunk)
                for ctx, kinds in plan:
                    job = CaptionJob.create(items=items, annotators=annotators(base, kinds),
                                            prompt="", source="cli")
                    rows = process_job(job, ctx, BULK_QUEUE).rows
                    if any(row.status != "ok" for row in rows):
                        raise RuntimeError(f"failed rows: {[r.error for r in rows]}")
                    ctx.writer.write(rows)
            return (count / (time.perf_counter() - start),
                    count / (time.process_time() - cpu))

        one = [(together, KINDS)]
        three = [(apart[kinds], kinds) for kinds in APART]
        run(one, job_size)  # warm-up
        run(three, job_size)
        runs = [(run(one, len(uris)), run(three, len(uris))) for _ in range(rounds)]
        for ctx in (together, *apart.values()):
            ctx.close()
    return ([(one[0], three[0]) for one, three in runs],
            [(one[1], three[1]) for one, three in runs])


def start_worker(settings: Settings, log_path: Path) -> tuple[subprocess.Popen[bytes], float]:
    """`captioner worker` in a fresh process, and its seconds from start to ready."""
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker"],
            env={**os.environ, **settings.as_env(), "HF_HUB_OFFLINE": "1"},
            stdout=log, stderr=subprocess.STDOUT,
        )
    while " ready: " not in log_path.read_text(errors="replace"):
        if worker.poll() is not None or time.perf_counter() - start > 600:
            worker.kill()
            raise RuntimeError(f"worker did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    return worker, time.perf_counter() - start


def stop(worker: subprocess.Popen[bytes]) -> None:
    worker.terminate()
    worker.wait(timeout=60)


def through_cli(files: list[bytes], job_size: int, rounds: int, cache: Path, postgres: str,
                ) -> tuple[list[tuple[float, float]], float, float]:
    """(one job, three jobs) images/s per round through a worker process, and its start-up
    seconds with the term cache missing and present."""
    database = f"captioner_bench_kinds_{os.getpid()}"
    with psycopg.connect(postgres, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    with (tempfile.TemporaryDirectory(prefix="bench-kinds-cli-") as tmp,
          PrivateRedis() as broker):
        seaweed = SeaweedS3(Path(tmp) / "seaweed")
        seaweed.start()
        worker = None
        try:
            s3 = seaweed.client()
            s3.create_bucket(Bucket="photos")
            settings = kind_settings(
                broker_url=broker.url, database_url=f"{postgres.rsplit('/', 1)[0]}/{database}",
                s3_endpoint_url=seaweed.endpoint, allowed_buckets=("photos",), kinds=KINDS,
                term_cache_dir=Path(tmp) / "empty-cache",
            )
            results = ResultsStore(settings.database_url)
            results.create_schema()
            worker, start_miss = start_worker(settings, Path(tmp) / "miss.log")
            stop(worker)
            settings = settings.model_copy(update={"term_cache_dir": cache})
            worker, start_hit = start_worker(settings, Path(tmp) / "worker.log")

            def run(plan: tuple[tuple[str, ...], ...], count: int) -> float:
                prefix = f"run-{uuid.uuid4().hex[:8]}/"
                uris = []
                for i, data in enumerate(files[:count]):
                    s3.put_object(Bucket="photos", Key=f"{prefix}{i:04d}.jpg", Body=data)
                    uris.append(f"s3://photos/{prefix}{i:04d}.jpg")
                before = sum(results.status_counts().values())
                start = time.perf_counter()
                with JobSender(create_app(settings), BULK_QUEUE) as sender:
                    for kinds in plan:
                        enqueue_uris(uris, sender, settings, batch_size=job_size, kinds=kinds)
                while sum(results.status_counts().values()) < before + 3 * count:
                    if time.perf_counter() - start > 600:
                        raise RuntimeError("the worker did not finish in time")
                    time.sleep(0.05)
                elapsed = time.perf_counter() - start
                if results.status_counts().get("failed", 0):
                    raise RuntimeError("failed rows: every image should annotate")
                return count / elapsed

            run((KINDS,), job_size)  # warm-up
            run(APART, job_size)
            runs = [(run((KINDS,), len(files)), run(APART, len(files))) for _ in range(rounds)]
            results.dispose()
        finally:
            if worker is not None:
                stop(worker)
            seaweed.stop()
            with psycopg.connect(postgres, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    return runs, start_miss, start_hit


def report_kinds(figures: dict[str, list[tuple[float, float]]], *, images: int, job_size: int,
                 ) -> None:
    print(f"\ncaption + tags + prompt for {images} images (0.5 MP JPEG) in jobs of {job_size}, "
          f"images/s with all three outputs")
    print(f"{'where':<32} {'round':>5} {'one job':>8} {'3 jobs':>8} {'ratio':>6}")
    for where, runs in figures.items():
        for i, (one, three) in enumerate(runs, 1):
            print(f"{where:<32} {i:>5} {one:>8.2f} {three:>8.2f} {one / three:>5.2f}x")
        median = statistics.median(one / three for one, three in runs)
        print(f"{where:<32} {'median ratio':>24} {median:>5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("terms", "kinds", "cli", "all"),
                        default="all", help="kinds: in-process only; cli: through the worker")
    parser.add_argument("--terms", type=int, default=1024, help="terms recomputed per image")
    parser.add_argument("--images", type=int, default=10, help="images per term figure")
    parser.add_argument("--kind-images", type=int, default=48)
    parser.add_argument("--job-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--term-cache", type=Path,
                        help="term embedding cache to reuse (default: a new one, filled once)")
    args = parser.parse_args()
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(name, value)
    torch.manual_seed(0)
    print(f"CPU threads: {torch.get_num_threads()}; terms per prompt: {COUNT}")
    if args.what in ("terms", "all"):
        full = load_term_lists()
        rows = []
        with tempfile.TemporaryDirectory(prefix="bench-clip-") as tmp:
            for name, sizes in SIZES.items():
                directory = build_tiny_clip(Path(tmp) / name, **sizes)
                rows.append(measure(name, directory, full, args.terms, args.images))
        report_terms(rows, len(full))
    if args.what == "terms":
        return
    photos = jpegs(0.5)
    files = [photos[i % len(photos)] for i in range(args.kind_images)]
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-terms-") as tmp:
        cache = args.term_cache or Path(tmp)
        if args.what in ("kinds", "all"):
            wall, cpu = in_process_kinds(files, args.job_size, args.rounds, cache)
            figures["in-process, images/s"] = wall
            figures["in-process, images/CPU-s"] = cpu
        if args.what in ("cli", "all"):
            cli, miss, hit = through_cli(files, args.job_size, args.rounds, cache, args.postgres)
            figures["CLI worker, Redis/S3/PostgreSQL"] = cli
    report_kinds(figures, images=len(files), job_size=args.job_size)
    if args.what in ("cli", "all"):
        print(f"\n`captioner worker` (caption, tags, interrogate) start to ready, fresh "
              f"process: term cache missing {miss:.1f} s, present {hit:.1f} s")


if __name__ == "__main__":
    main()
