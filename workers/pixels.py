"""Decoded image -> model input, without the Hugging Face image processor on the hot path.

The processor resizes, rescales and normalizes one image at a time in float64 NumPy: most of
a worker's CPU per image after decoding. Here the per-image work (in a decode thread) is only
the resize, straight to the model's square resolution with the processor's own filter, kept
as uint8; a whole micro-batch is then moved to the device as uint8 (4x fewer bytes than float,
pinned and non-blocking on CUDA) and rescaled + normalized there in one fused multiply-add.
The result matches the processor's `pixel_values` to float rounding (tests/test_pixels.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from captioning.errors import ModelLoadError

#: One image at the model's resolution: (size, size, 3) uint8, RGB, channels last.
ModelPixels = np.ndarray


@dataclass(frozen=True)
class PixelSpec:
    """What the checkpoint's image processor does to an image, read from its config."""

    size: int
    resample: Image.Resampling
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_processor(cls, image_processor: object) -> PixelSpec:
        """Raise ModelLoadError for a processor doing something this module does not
        reproduce (a crop, no normalization, a non-square size), rather than feed the
        model pixels it was not trained on."""
        def get(name: str) -> Any:
            return getattr(image_processor, name, None)

        size = dict(get("size") or {})
        height, width = size.get("height"), size.get("width")
        unsupported = [
            name
            for name, ok in (
                ("square size", height is not None and height == width),
                ("do_resize", get("do_resize")),
                ("do_rescale", get("do_rescale")),
                ("do_normalize", get("do_normalize")),
                ("no center crop", not get("do_center_crop")),
                ("no padding", not get("do_pad")),
            )
            if not ok
        ]
        if unsupported:
            raise ModelLoadError(
                f"image processor {type(image_processor).__name__} ({size}) is not the BLIP "
                f"resize+normalize this worker reproduces: needs {', '.join(unsupported)}"
            )
        return cls(
            size=int(height),
            resample=Image.Resampling(int(get("resample"))),
            rescale=float(get("rescale_factor")),
            mean=_triple(get("image_mean")),
            std=_triple(get("image_std")),
        )


def _triple(values: object) -> tuple[float, float, float]:
    items = [float(v) for v in values] if isinstance(values, Sequence) else [float(values)] * 3
    return items[0], items[1], items[2]


def to_model_pixels(image: Image.Image, spec: PixelSpec) -> ModelPixels:
    """Resize an RGB image straight to (size, size), as the processor does, kept uint8."""
    if image.size != (spec.size, spec.size):
        image = image.resize((spec.size, spec.size), spec.resample)
    return np.asarray(image, dtype=np.uint8)


class Normalizer:
    """uint8 batches -> normalized `pixel_values` on one device, scale and bias precomputed.

    (x * rescale - mean) / std == x * (rescale / std) + (-mean / std): one fused op per batch.
    """

    def __init__(self, spec: PixelSpec, device: torch.device, dtype: torch.dtype) -> None:
        std = torch.tensor(spec.std, dtype=torch.float32)
        mean = torch.tensor(spec.mean, dtype=torch.float32)
        self._scale = (spec.rescale / std).view(1, 3, 1, 1).to(device)
        self._bias = (-mean / std).view(1, 3, 1, 1).to(device)
        self._device = device
        self._dtype = dtype
        self._pin = device.type == "cuda"

    def __call__(self, pixels: Sequence[ModelPixels]) -> torch.Tensor:
        """(B, 3, size, size) in the model's dtype on its device."""
        batch = torch.from_numpy(np.stack(pixels))
        if self._pin:
            batch = batch.pin_memory()  # lets the copy below overlap with queued GPU work
        batch = batch.to(self._device, non_blocking=True).permute(0, 3, 1, 2)
        # Normalize in float32 like the processor, then cast to what the vision tower runs in.
        normalized = torch.addcmul(self._bias, batch.to(torch.float32), self._scale)
        return normalized.to(self._dtype).contiguous()
