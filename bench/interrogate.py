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

    .venv/bin/python -m bench.interrogate [--terms 2048] [--images 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.photos import sample_images
from captioning.settings import Settings
from workers.interrogate.ranking import TermTable, fast_prompt, rank_terms
from workers.interrogate.term_cache import encode_terms, term_table
from workers.interrogate.terms import TermLists, load_term_lists
from workers.pixels import ModelPixels
from workers.runtimes.clip import ClipRuntime
from workers.runtimes.interrogate import Interrogator
from workers.runtimes.tiny import build_tiny_clip

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--terms", type=int, default=2048, help="terms recomputed per image")
    parser.add_argument("--images", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    full = load_term_lists()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-clip-") as tmp:
        for name, sizes in SIZES.items():
            directory = build_tiny_clip(Path(tmp) / name, **sizes)
            rows.append(measure(name, directory, full, args.terms, args.images))
    print(f"CPU threads: {torch.get_num_threads()}; terms per prompt: {COUNT}")
    report_terms(rows, len(full))


if __name__ == "__main__":
    main()
