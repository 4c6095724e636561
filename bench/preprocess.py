"""CPU milliseconds per image, JPEG bytes -> model pixel_values: naive against ours.

naive: Image.open().convert("RGB") (full decode), then the Hugging Face BLIP image processor
       (resize + rescale + normalize per image, float64 NumPy), as most BLIP-2 examples do.
ours:  the worker's path: decode_image (JPEG draft mode at the smallest DCT scale >= the
       model's input, EXIF, box reduce), resize straight to the model's resolution as uint8,
       then one fused normalize over the whole batch.

Both run single-threaded in this process and are timed with process_time (CPU time, so other
load on the machine does not count against either); rounds alternate naive and ours.

    .venv/bin/python -m bench.preprocess [--size 224] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from transformers import BlipImageProcessorPil

from bench.photos import jpegs
from workers.images import decode_image
from workers.pixels import Normalizer, PixelSpec, to_model_pixels

MAX_PIXELS = 64_000_000


def naive(processor: BlipImageProcessorPil) -> Callable[[list[bytes]], torch.Tensor]:
    def run(files: list[bytes]) -> torch.Tensor:
        images = [Image.open(io.BytesIO(data)).convert("RGB") for data in files]
        return processor(images=images, return_tensors="pt")["pixel_values"]

    return run


def ours(spec: PixelSpec) -> Callable[[list[bytes]], torch.Tensor]:
    normalize = Normalizer(spec, torch.device("cpu"), torch.float32)

    def run(files: list[bytes]) -> torch.Tensor:
        pixels = [
            to_model_pixels(
                decode_image(data, max_pixels=MAX_PIXELS, target_size=spec.size).image, spec
            )
            for data in files
        ]
        return normalize(pixels)

    return run


def cpu_ms_per_image(run: Callable[[list[bytes]], torch.Tensor], files: list[bytes]) -> float:
    start = time.process_time()
    run(files)
    return (time.process_time() - start) * 1000 / len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="model input (blip2-opt-2.7b: 224)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--copies", type=int, default=2, help="each sample photo repeated")
    args = parser.parse_args()
    torch.set_num_threads(1)

    processor = BlipImageProcessorPil(size={"height": args.size, "width": args.size})
    spec = PixelSpec.from_processor(processor)
    methods = {"naive": naive(processor), "ours": ours(spec)}
    cases = {"12 MP JPEG": jpegs(12.0), "0.5 MP JPEG": jpegs(0.5)}

    print(f"JPEG -> {args.size}x{args.size} pixel_values, CPU ms/image, median of {args.rounds} "
          f"rounds; torch {torch.__version__} (1 thread), Pillow {Image.__version__}")
    print(f"{'images':<12} {'n':>3} {'naive ms':>9} {'ours ms':>8} {'speedup':>8} "
          f"{'mean |diff|':>12} {'max |diff|':>11}")
    for case, photos in cases.items():
        files = photos * args.copies
        reference, fast = methods["naive"](files[:5]), methods["ours"](files[:5])
        levels = (reference - fast).abs() * torch.tensor(spec.std).view(1, 3, 1, 1) * 255
        timings: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, run in methods.items():
                timings[name].append(cpu_ms_per_image(run, files))
        naive_ms, ours_ms = (statistics.median(timings[n]) for n in ("naive", "ours"))
        print(f"{case:<12} {len(files):>3} {naive_ms:>9.1f} {ours_ms:>8.1f} "
              f"{naive_ms / ours_ms:>7.1f}x {float(levels.mean()):>8.2f} lvl "
              f"{float(np.float32(levels.max())):>7.1f} lvl")
    print("diff: ours against naive, in 0-255 pixel levels (draft decode + box reduce "
          "before the same bicubic resize)")


if __name__ == "__main__":
    main()
