"""What a million images cost: GPU-hours, object-store requests, Redis, database, dollars.

    .venv/bin/python -m bench.cost                          # list prices, 300 images/s per GPU
    .venv/bin/python -m bench.cost --images-per-second 120 --gpu-hour 2.49 --put-per-1000 0.005

Prints sidecar and Parquet output side by side. The request counts follow from how the code
works (named in each row), not from guesses: a backfill lists 1,000 keys per LIST, a worker
GETs each image once, writes one sidecar PUT per image or one Parquet PUT per job; `bench.datasets
puts` counts the same PUTs on a real server. Default prices are list prices (USD, us-east-1,
on-demand): S3 Standard PUT/LIST $0.005 per 1,000, GET $0.0004 per 1,000. GPUs have no one
list price: the default $3.00 per GPU-hour is an assumption, pass yours (--gpu-hour). Redis and
the database are sized, not priced: fixed-size services whose cost does not grow per image.
Output bytes come from the writers' own encoders on a typical row.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from datetime import UTC, datetime

from captioning.parquet import parquet_bytes
from captioning.results import CaptionRow, sidecar_body

KEYS_PER_LIST = 1000


def typical_row(n: int) -> CaptionRow:
    when = datetime(2026, 12, 1, tzinfo=UTC)
    return CaptionRow(
        uri=f"s3://my-photos/2024/06/IMG_{n:07d}.jpg", bucket="my-photos",
        key=f"2024/06/IMG_{n:07d}.jpg", etag=f"{n:032x}", version_id=None,
        model="Salesforce/blip2-opt-2.7b", prompt="", status="ok",
        caption="a photograph of a dog running on a beach at sunset", error=None,
        width=4032, height=3024, bytes=3_145_728, enqueued_at=when, finished_at=when,
        worker="gpu-worker-7:1234", content_digest=f"{n:064x}",
    )


def output_bytes_per_image(output: str, images_per_job: int) -> float:
    """Bytes in S3 per image, from the writers' own encoders on a typical row."""
    if output == "sidecar":
        return len(sidecar_body(typical_row(0)))
    rows = [typical_row(n) for n in range(images_per_job)]
    return len(parquet_bytes(rows)) / images_per_job


@dataclass(frozen=True)
class Prices:
    gpu_hour: float
    put_per_1000: float
    list_per_1000: float
    get_per_1000: float


@dataclass(frozen=True)
class Workload:
    images: int
    images_per_second: float
    images_per_job: int
    redis_bytes_per_image: float
    listed: bool  # False: keys from an S3 Inventory report (a few GETs, no LIST)


@dataclass(frozen=True)
class Cost:
    output: str
    gpu_hours: float
    lists: int
    gets: int
    puts: int
    output_bytes: float

    def dollars(self, prices: Prices) -> dict[str, float]:
        return {
            "GPU": self.gpu_hours * prices.gpu_hour,
            "LIST": self.lists / 1000 * prices.list_per_1000,
            "GET": self.gets / 1000 * prices.get_per_1000,
            "PUT": self.puts / 1000 * prices.put_per_1000,
        }


def cost(work: Workload, output: str) -> Cost:
    """One workload with `output` = "sidecar" (a PUT per image) or "parquet" (a PUT per job)."""
    jobs = math.ceil(work.images / work.images_per_job)
    lists = math.ceil(work.images / KEYS_PER_LIST) if work.listed else 0
    puts = work.images if output == "sidecar" else jobs
    per_row = output_bytes_per_image(output, work.images_per_job)
    return Cost(
        output=output,
        gpu_hours=work.images / work.images_per_second / 3600,
        lists=lists,
        gets=work.images,  # each image fetched once (ranged GET)
        puts=puts,
        output_bytes=work.images * per_row,
    )


def report(work: Workload, prices: Prices) -> str:
    costs = [cost(work, "sidecar"), cost(work, "parquet")]
    lines = [
        f"{work.images:,} images at {work.images_per_second:g} images/s per GPU, "
        f"{work.images_per_job} per job, keys from "
        f"{'ListObjectsV2' if work.listed else 'an S3 Inventory report'}",
        "",
        f"{'':<28}" + "".join(f"{c.output:>14}" for c in costs),
        f"{'GPU-hours':<28}" + "".join(f"{c.gpu_hours:>14.2f}" for c in costs),
        f"{'LIST requests':<28}" + "".join(f"{c.lists:>14,}" for c in costs),
        f"{'GET requests':<28}" + "".join(f"{c.gets:>14,}" for c in costs),
        f"{'PUT requests':<28}" + "".join(f"{c.puts:>14,}" for c in costs),
        f"{'output in S3 (MB)':<28}" + "".join(f"{c.output_bytes / 1e6:>14,.0f}" for c in costs),
    ]
    for kind in ("GPU", "LIST", "GET", "PUT"):
        lines.append(f"{'$ ' + kind:<28}" + "".join(f"{c.dollars(prices)[kind]:>14.2f}"
                                                    for c in costs))
    lines.append(f"{'$ total':<28}" + "".join(f"{sum(c.dollars(prices).values()):>14.2f}"
                                              for c in costs))
    peak_redis = work.redis_bytes_per_image * 100_000
    all_queued = work.redis_bytes_per_image * work.images
    lines += [
        "",
        f"Redis: {work.redis_bytes_per_image:g} bytes per queued image; a backfill held at the "
        f"default --max-queue-depth 100,000 peaks near {peak_redis / 2**20:.1f} MiB "
        f"(all {work.images:,} queued at once: {all_queued / 2**20:,.0f} MiB).",
        f"Database: {work.images:,} rows (one per image), upserted {work.images_per_job} per "
        "statement.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--images-per-second", type=float, default=300.0,
                        help="per GPU, measured (bench.gpu) or the goal (default 300)")
    parser.add_argument("--images-per-job", type=int, default=32)
    parser.add_argument("--redis-bytes-per-image", type=float, default=94.0,
                        help="measured by bench.datasets enqueue (default: 32 per job, S3 ETags)")
    parser.add_argument("--inventory", action="store_true",
                        help="keys come from an S3 Inventory report instead of LIST calls")
    parser.add_argument("--gpu-hour", type=float, default=3.00, help="USD per GPU-hour")
    parser.add_argument("--put-per-1000", type=float, default=0.005, help="USD, S3 Standard")
    parser.add_argument("--list-per-1000", type=float, default=0.005, help="USD, S3 Standard")
    parser.add_argument("--get-per-1000", type=float, default=0.0004, help="USD, S3 Standard")
    args = parser.parse_args()
    work = Workload(images=args.images, images_per_second=args.images_per_second,
                    images_per_job=args.images_per_job,
                    redis_bytes_per_image=args.redis_bytes_per_image, listed=not args.inventory)
    prices = Prices(gpu_hour=args.gpu_hour, put_per_1000=args.put_per_1000,
                    list_per_1000=args.list_per_1000, get_per_1000=args.get_per_1000)
    print(report(work, prices))


if __name__ == "__main__":
    main()
