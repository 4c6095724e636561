"""The BLIP-2 caption runtime: loaded once per worker process, then preprocess -> predict ->
postprocess.

Each step is a plain method so it can be tested alone (LitServe's shape). `caption()` runs
the three over micro-batches of `settings.batch_size`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor
from transformers.utils import logging as hf_logging

from captioning.errors import ModelLoadError
from captioning.settings import Settings
from workers.pixels import ModelPixels, Normalizer, PixelSpec, to_model_pixels
from workers.runtimes import loading, tiny
from workers.runtimes.base import Annotation, Results, annotate_in_batches

log = logging.getLogger(__name__)

#: The start-up batch probe stops once a batch peaks above this share of GPU memory.
MEMORY_HEADROOM = 0.8


class CaptionModel:
    """One BLIP-2 model and its processor on one device."""

    def __init__(
        self,
        *,
        name: str,
        model: Blip2ForConditionalGeneration,
        processor: Blip2Processor,
        dtype: torch.dtype,
        settings: Settings,
    ) -> None:
        self.name = name
        self.model = model
        self.processor = processor
        self.device: torch.device = model.device
        # Not model.dtype: the Q-Former stays fp32 whatever was asked, by transformers' design.
        self.dtype = dtype
        self.pixel_spec = PixelSpec.from_processor(processor.image_processor)
        self.image_size: int = model.config.vision_config.image_size
        # The processor's resize is approximated anyway (tests/test_pixels.py): decode may
        # shrink to the model's size first, which is most of the decode time saved.
        self.decode_size: int | None = self.image_size
        if self.pixel_spec.size != self.image_size:
            raise ModelLoadError(
                f"processor resizes to {self.pixel_spec.size}px but the vision tower of "
                f"{name!r} expects {self.image_size}px"
            )
        self.is_placeholder = name in tiny.TWINS
        self.batch_size = settings.batch_size
        self._normalize = Normalizer(self.pixel_spec, self.device, dtype)
        self._generate_options: dict[str, object] = {
            "max_new_tokens": settings.max_new_tokens,
            "num_beams": settings.num_beams,
            "do_sample": False,
        }
        if settings.static_cache:
            self._generate_options["cache_implementation"] = "static"

    @classmethod
    def load(cls, settings: Settings) -> CaptionModel:
        """Load `settings.model` (HF id, local directory or tiny twin) onto its device.

        Raises ModelLoadError with what to do about it; the worker cannot start without it.
        Attention defaults to SDPA where the architecture supports it (transformers picks
        it, falling back to eager).
        """
        hf_logging.disable_progress_bar()  # per-shard bars are noise in a worker's log
        device = loading.device(settings.device)
        dtype = loading.dtype(settings.dtype, device)
        quantization = loading.quantization_config(settings.quantization, device)
        with loading.checkpoint(settings.model, setting="CAPTIONER_MODEL") as source:
            try:
                processor = Blip2Processor.from_pretrained(
                    source.location, local_files_only=source.local_only
                )
                if quantization is None:
                    model = Blip2ForConditionalGeneration.from_pretrained(
                        source.location, dtype=dtype, local_files_only=source.local_only
                    ).to(device)
                else:  # bitsandbytes places the quantized weights itself
                    model = Blip2ForConditionalGeneration.from_pretrained(
                        source.location,
                        dtype=dtype,
                        local_files_only=source.local_only,
                        quantization_config=quantization,
                        device_map={"": device.index or 0},
                    )
            except Exception as exc:
                raise ModelLoadError(
                    f"cannot load BLIP-2 model {settings.model!r} on {device}: {exc}"
                ) from exc
        model.eval()
        # A decoder-only LM continues from the last position, so its pads go on the left; an
        # encoder-decoder (T5) reads the prompt whole and is padded on the right as trained.
        processor.tokenizer.padding_side = (
            "left" if model.config.use_decoder_only_language_model else "right"
        )
        runtime = cls(
            name=settings.model, model=model, processor=processor, dtype=dtype, settings=settings
        )
        runtime.warm_up(settings)
        return runtime

    def to_pixels(self, image: Image.Image) -> ModelPixels:
        """One decoded RGB image -> uint8 pixels at the model's resolution (thread-safe)."""
        return to_model_pixels(image, self.pixel_spec)

    def preprocess(self, pixels: Sequence[ModelPixels], prompt: str) -> dict[str, torch.Tensor]:
        """Model inputs for one micro-batch, already on the device.

        Every image of a job shares its prompt, so the prompt is tokenized once (cached) and
        the batch needs no padding. Never truncated: the processor prepends
        `num_query_tokens` `<image>` tokens that the model replaces with the image.
        """
        input_ids, attention_mask = self._prompt_ids(prompt)
        count = len(pixels)
        return {
            "pixel_values": self._normalize(pixels),
            "input_ids": input_ids.repeat(count, 1),
            "attention_mask": attention_mask.repeat(count, 1),
        }

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one runtime per process, lives as long
    def _prompt_ids(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        blank = Image.new("RGB", (self.image_size, self.image_size))
        encoded = self.processor(images=[blank], text=[prompt], return_tensors="pt")
        return (
            encoded["input_ids"].to(self.device),
            encoded["attention_mask"].to(self.device),
        )

    @torch.inference_mode()
    def predict(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Greedy (or beam) generate() on the model's device; returns token ids."""
        tensors = {name: tensor.to(self.device) for name, tensor in inputs.items()}
        tensors["pixel_values"] = tensors["pixel_values"].to(self.dtype)
        return self.model.generate(**tensors, **self._generate_options)

    def postprocess(
        self, output_ids: torch.Tensor, inputs: Mapping[str, torch.Tensor]
    ) -> list[str]:
        """Token ids -> captions. A decoder-only model's output starts with the prompt
        (image tokens and text), which is cut off; an encoder-decoder's does not."""
        if self.model.config.use_decoder_only_language_model:
            output_ids = output_ids[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(output_ids.cpu(), skip_special_tokens=True)
        return [text.strip() for text in texts]

    def generate(self, pixels: Sequence[ModelPixels], prompt: str) -> list[str]:
        """Captions for one micro-batch. On CUDA out-of-memory (a longer prompt than the
        start-up probe saw) the batch is split in two and the smaller size kept from then on."""
        try:
            inputs = self.preprocess(pixels, prompt)
            return self.postprocess(self.predict(inputs), inputs)
        except torch.OutOfMemoryError:
            if len(pixels) == 1:
                raise
            torch.cuda.empty_cache()
            half = (len(pixels) + 1) // 2
            self.batch_size = min(self.batch_size, half)
            log.warning("CUDA out of memory at batch %d; micro-batches now %d", len(pixels), half)
            return self.generate(pixels[:half], prompt) + self.generate(pixels[half:], prompt)

    def annotate(
        self, pixels: Sequence[ModelPixels], prompt: str, earlier: Sequence[Results] = ()
    ) -> list[Annotation]:
        """The runtime interface: one micro-batch's captions as annotations (built on
        no other kind's results)."""
        return [Annotation(text) for text in self.generate(pixels, prompt)]

    def caption_pixels(self, pixels: Sequence[ModelPixels], prompt: str) -> list[str]:
        """Captions for `pixels`, in order, in micro-batches of `batch_size`."""
        return [result.text for result in annotate_in_batches(self, pixels, prompt)]

    def caption(self, images: Sequence[Image.Image], prompt: str) -> list[str]:
        """Captions for decoded images, in order (the worker feeds `caption_pixels` from its
        decode threads instead)."""
        return self.caption_pixels([self.to_pixels(image) for image in images], prompt)

    def warm_up(self, settings: Settings) -> None:
        """Before the first job: on CUDA, measure the largest micro-batch that fits (when
        `auto_batch_size`), then run one generate() so kernels, allocator (and compiled graphs
        with `static_cache`) are ready. Quantized models must not caption empty: 8/4-bit
        loading has returned empty captions in some bitsandbytes/transformers releases."""
        if self.device.type == "cuda" and settings.auto_batch_size:
            self.batch_size = self._largest_batch(settings.max_batch_size, settings.prompt)
            log.info("micro-batch size measured on %s: %d", self.device, self.batch_size)
        captions = self.generate(self._blank_pixels(min(self.batch_size, 2)), settings.prompt)
        if settings.quantization != "none" and not any(captions):
            raise ModelLoadError(
                f"CAPTIONER_QUANTIZATION={settings.quantization} produced only empty captions "
                "on a test image (a known bitsandbytes/transformers failure); unset it to run "
                "in fp16/bf16"
            )

    def _blank_pixels(self, count: int) -> list[ModelPixels]:
        gray = np.full((self.image_size, self.image_size, 3), 128, dtype=np.uint8)
        return [gray] * count

    @torch.inference_mode()
    def _largest_batch(self, limit: int, prompt: str) -> int:
        """Double the batch from 1 while a full-length generate() fits and the peak stays
        under MEMORY_HEADROOM of the GPU (room for longer prompts than the default one)."""
        total = torch.cuda.get_device_properties(self.device).total_memory
        best, size = 1, 1
        while True:
            torch.cuda.reset_peak_memory_stats(self.device)
            inputs = self.preprocess(self._blank_pixels(size), prompt)
            longest = self._generate_options["max_new_tokens"]
            try:
                self.model.generate(**inputs, **self._generate_options, min_new_tokens=longest)
            except torch.OutOfMemoryError:
                break
            finally:
                del inputs
            best = size
            if size >= limit or torch.cuda.max_memory_allocated(self.device) > (
                MEMORY_HEADROOM * total
            ):
                break
            size = min(size * 2, limit)
        torch.cuda.empty_cache()
        return best
