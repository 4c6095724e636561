"""Benchmark inputs made from the sample photos: 12-megapixel and ~0.5-megapixel JPEGs."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

SAMPLES = Path(__file__).resolve().parent.parent / "captioning" / "samples"


def sample_images() -> list[Image.Image]:
    return [
        Image.open(path).convert("RGB")
        for path in sorted(SAMPLES.iterdir())
        if path.suffix in {".png", ".jpg"}
    ]


def jpegs(megapixels: float, *, quality: int = 90) -> list[bytes]:
    """Each sample resized (upscaled for 12 MP) to a 4:3 frame of `megapixels`, as JPEG."""
    width = round((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = width * 3 // 4
    out = []
    for image in sample_images():
        buf = io.BytesIO()
        image.resize((width, height), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out
