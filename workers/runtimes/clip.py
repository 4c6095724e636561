"""The CLIP runtime: unit-length image and text embeddings from one transformers CLIPModel.

Used by the `interrogate` kind. Images go through CLIP's own preprocessing (shortest edge
resized, centre square cropped), reproduced on uint8 pixels in the decode threads and
normalised on the device as for BLIP-2 (workers/pixels.py). `tiny-random-clip` (tiny.py)
loads through the same code as `openai/clip-vit-large-patch14`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from captioning.errors import ModelLoadError
from captioning.settings import Settings
from workers.pixels import ModelPixels, Normalizer, PixelSpec
from workers.runtimes import loading, tiny


def clip_pixel_spec(image_processor: Any) -> tuple[PixelSpec, int]:
    """(normalisation and crop size, shortest edge) of CLIP's resize + centre crop, read
    from the checkpoint's processor; ModelLoadError for one this module does not reproduce,
    rather than feed the model pixels it was not trained on."""
    size = dict(image_processor.size or {})
    crop = dict(image_processor.crop_size or {})
    shortest, side = size.get("shortest_edge"), crop.get("height")
    steps = (image_processor.do_resize, image_processor.do_center_crop,
             image_processor.do_rescale, image_processor.do_normalize)
    if not (shortest and side and side == crop.get("width") and side <= shortest and all(steps)):
        raise ModelLoadError(
            f"CLIP image processor {type(image_processor).__name__} (size {size}, crop {crop}) "
            "is not the shortest-edge resize + square centre crop + normalise this worker "
            "reproduces"
        )
    mean, std = list(image_processor.image_mean), list(image_processor.image_std)
    spec = PixelSpec(
        size=int(side),
        resample=Image.Resampling(int(image_processor.resample)),
        rescale=float(image_processor.rescale_factor),
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
    )
    return spec, int(shortest)


def crop_pixels(image: Image.Image, spec: PixelSpec, shortest: int) -> ModelPixels:
    """Resize the shortest edge to `shortest` (the long one truncated, as transformers
    computes it) with the processor's filter, then crop the centre square, kept uint8."""
    width, height = image.size
    if width <= height:
        new_size = (shortest, int(shortest * height / width))
    else:
        new_size = (int(shortest * width / height), shortest)
    if image.size != new_size:
        image = image.resize(new_size, spec.resample)
    top = (new_size[1] - spec.size) // 2
    left = (new_size[0] - spec.size) // 2
    return np.asarray(image, dtype=np.uint8)[top : top + spec.size, left : left + spec.size]


class ClipRuntime:
    """One CLIPModel and its processor on one device."""

    def __init__(
        self, *, name: str, model: CLIPModel, processor: CLIPProcessor, dtype: torch.dtype
    ) -> None:
        self.name = name
        self.is_placeholder = name in tiny.TWINS
        self.model = model
        self.processor = processor
        self.device: torch.device = model.device
        self.dtype = dtype
        self.pixel_spec, self.shortest_edge = clip_pixel_spec(processor.image_processor)
        #: What decode must keep at least (JPEG draft mode): the edge CLIP resizes to.
        self.image_size = self.shortest_edge
        self.context: int = model.config.text_config.max_position_embeddings
        self._normalize = Normalizer(self.pixel_spec, self.device, dtype)

    @classmethod
    def load(cls, settings: Settings) -> ClipRuntime:
        """Load `settings.clip_model` (HF id, local directory or tiny twin) on the worker's
        device and dtype; ModelLoadError says what to do when it cannot."""
        loaded = loading.load_pretrained(
            settings.clip_model, setting="CAPTIONER_CLIP_MODEL", what="CLIP model",
            processor_class=CLIPProcessor, model_class=CLIPModel,
            device_name=settings.device, dtype_name=settings.dtype,
        )
        return cls(name=settings.clip_model, model=loaded.model, processor=loaded.processor,
                   dtype=loaded.dtype)

    def to_pixels(self, image: Image.Image) -> ModelPixels:
        """One decoded RGB image -> uint8 centre crop at CLIP's resolution (thread-safe)."""
        return crop_pixels(image, self.pixel_spec, self.shortest_edge)

    @torch.inference_mode()
    def image_embeddings(self, pixels: Sequence[ModelPixels]) -> torch.Tensor:
        """(len(pixels), dim) unit-length image embeddings."""
        features = self.model.get_image_features(pixel_values=self._normalize(pixels))
        return torch.nn.functional.normalize(features.pooler_output.float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), dim) unit-length text embeddings, texts cut to CLIP's context."""
        tokens = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.context,
            return_tensors="pt",
        ).to(self.device)
        features = self.model.get_text_features(**tokens)
        return torch.nn.functional.normalize(features.pooler_output.float(), dim=-1)

    def fits(self, text: str) -> bool:
        """Whether `text` (with its start and end tokens) fits CLIP's text context."""
        return len(self.processor.tokenizer(text)["input_ids"]) <= self.context

    @functools.cached_property
    def identity(self) -> str:
        """sha256 of the text tower's weights and the tokenizer: what term embeddings
        depend on, whatever the checkpoint is called or wherever it was loaded from."""
        digest = hashlib.sha256(self.processor.tokenizer.backend_tokenizer.to_str().encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            if name.startswith(("text_model.", "text_projection.")):
                digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
        return digest.hexdigest()
