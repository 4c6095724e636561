"""Our image path against the Hugging Face BLIP image processor it replaces on the hot path."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import BlipImageProcessorPil

from captioning.errors import ModelLoadError
from tests.imagefactory import PHOTOS_DIR
from workers.images import decode_image
from workers.pixels import Normalizer, PixelSpec, to_model_pixels

CPU = torch.device("cpu")


def photos() -> list[Image.Image]:
    files = sorted(p for p in PHOTOS_DIR.iterdir() if p.suffix != ".md")
    odd = [Image.new("RGB", (1, 1), "white"), Image.new("RGB", (4000, 3), "navy")]
    return [Image.open(p).convert("RGB") for p in files] + odd


@pytest.mark.parametrize("size", [32, 224, 384])
def test_pixels_match_the_processor(size: int) -> None:
    processor = BlipImageProcessorPil(size={"height": size, "width": size})
    spec = PixelSpec.from_processor(processor)
    images = photos()
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    ours = Normalizer(spec, CPU, torch.float32)([to_model_pixels(i, spec) for i in images])
    assert ours.shape == expected.shape == (len(images), 3, size, size)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_half_precision_output() -> None:
    spec = PixelSpec.from_processor(BlipImageProcessorPil(size={"height": 32, "width": 32}))
    out = Normalizer(spec, CPU, torch.bfloat16)([to_model_pixels(photos()[0], spec)])
    assert out.dtype == torch.bfloat16 and out.is_contiguous()


def test_draft_decode_stays_close_to_a_full_decode() -> None:
    """JPEG draft + box reduce before the resize: not bit-equal to decoding every pixel,
    but within a pixel level or two on average."""
    processor = BlipImageProcessorPil(size={"height": 224, "width": 224})
    spec = PixelSpec.from_processor(processor)
    buf = io.BytesIO()
    photos()[0].resize((2400, 1800), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    full = processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")
    decoded = decode_image(data, max_pixels=64_000_000, target_size=224)
    assert decoded.image.size == (300, 225)  # 1/8 DCT scale: the smallest >= 224
    ours = Normalizer(spec, CPU, torch.float32)([to_model_pixels(decoded.image, spec)])
    levels = (ours - full["pixel_values"]).abs() * torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    assert float(levels.mean()) < 2.0


def test_processors_we_cannot_reproduce_are_refused() -> None:
    cropping = BlipImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=True,
                                     crop_size={"height": 24, "width": 24})
    with pytest.raises(ModelLoadError, match="center crop"):
        PixelSpec.from_processor(cropping)
    with pytest.raises(ModelLoadError, match="square"):
        PixelSpec.from_processor(BlipImageProcessorPil(size={"height": 32, "width": 48}))
