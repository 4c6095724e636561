"""The BLIP-2 caption runtime: loaded once per worker process, then preprocess -> predict ->
postprocess.

Each step is a plain method so it can be tested alone (LitServe's shape). `caption()` runs
the three over micro-batches of `settings.batch_size`.

Generation starts from the vision side's output (`encode`: ViT, then Q-Former queries), not
from pixels, so one vision pass serves every prompt of a job, every CapFilt candidate, and an
ITM scorer (runtimes/itm.py) whose frozen ViT has the same weights as this model's.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import (
    Blip2ForConditionalGeneration,
    Blip2Processor,
    LogitsProcessor,
    LogitsProcessorList,
)
from transformers.utils import logging as hf_logging

from captioning.errors import ModelLoadError
from captioning.settings import Settings
from workers.pixels import ModelPixels, Normalizer, PixelSpec, to_model_pixels
from workers.runtimes import loading, tiny
from workers.runtimes.base import Annotation, Candidate, Results, annotate_in_batches
from workers.runtimes.itm import Score, ScoreModel, vision_digest

log = logging.getLogger(__name__)

#: The start-up batch probe stops once a batch peaks above this share of GPU memory.
MEMORY_HEADROOM = 0.8


@dataclass(frozen=True)
class Encoded:
    """A micro-batch after the vision side: the ViT's output (what a scorer sharing the tower
    reads) and the projected Q-Former queries (what the language model reads, any prompt)."""

    image_embeds: torch.Tensor
    language_inputs: torch.Tensor


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
        self._top_p, self._temperature = settings.top_p, settings.temperature
        self.candidates = settings.candidates
        self.scorer: ScoreModel | None = None
        self.shares_vision = False

    def attach_scorer(self, scorer: ScoreModel) -> None:
        """Score every caption with `scorer`. Its ViT is skipped when its weights (digest,
        not name) and pixels are this model's; otherwise it runs too, and the log says so."""
        if scorer.pixel_spec.size != self.image_size:
            raise ModelLoadError(
                f"scorer {scorer.name!r} reads {scorer.pixel_spec.size}px images but captioner "
                f"{self.name!r} reads {self.image_size}px: pick a scorer of the same resolution"
            )
        self.scorer = scorer
        self.shares_vision = scorer.vision_digest == vision_digest(
            self.model.vision_model, self.pixel_spec
        )
        if self.shares_vision:
            log.info("scorer %s has the vision tower of %s (same weight digest): one vision "
                     "pass per image feeds both", scorer.name, self.name)
        else:
            log.warning("scorer %s and captioner %s have different vision towers (weight "
                        "digests differ): each image runs both", scorer.name, self.name)

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
        if settings.scorer is not None:
            runtime.attach_scorer(ScoreModel.load(settings))
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
    def _prompt_ids(self, *prompts: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One row per prompt, padded to the longest on the tokenizer's side."""
        blank = Image.new("RGB", (self.image_size, self.image_size))
        encoded = self.processor(
            images=[blank] * len(prompts), text=list(prompts), padding=True, return_tensors="pt"
        )
        return (
            encoded["input_ids"].to(self.device),
            encoded["attention_mask"].to(self.device),
        )

    @torch.inference_mode()
    def predict(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Greedy (or beam) generation on the model's device; returns token ids."""
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        return self._generate(
            self.encode(pixel_values).language_inputs,
            inputs["input_ids"].to(self.device),
            inputs["attention_mask"].to(self.device),
            self._generate_options,
        )

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> Encoded:
        """The vision side of Blip2ForConditionalGeneration.generate: ViT, Q-Former, projection."""
        model = self.model
        image_embeds = model.vision_model(pixel_values, return_dict=True).last_hidden_state
        queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = model.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(
                image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device
            ),
            return_dict=True,
        ).last_hidden_state
        # The Q-Former is kept in fp32; the language model reads the vision dtype.
        query_output = query_output.to(image_embeds.dtype)
        return Encoded(image_embeds, model.language_projection(query_output))

    def _generate(
        self,
        language_inputs: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        options: Mapping[str, object],
    ) -> torch.Tensor:
        """The language side of Blip2ForConditionalGeneration.generate: the queries replace
        the prompt's `<image>` tokens, then the language model generates."""
        model = self.model
        embeds = model.get_input_embeddings()(input_ids)
        image_slots = (input_ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_slots, language_inputs.to(embeds.dtype))
        inputs = {"inputs_embeds": embeds, "attention_mask": attention_mask}
        if not model.language_model.config.is_encoder_decoder:
            inputs["input_ids"] = input_ids
        return model.language_model.generate(**inputs, **options)

    def postprocess(
        self, output_ids: torch.Tensor, inputs: Mapping[str, torch.Tensor]
    ) -> list[str]:
        """Token ids -> captions."""
        return self._decode(output_ids, inputs["input_ids"].shape[1])

    def _decode(self, output_ids: torch.Tensor, prompt_length: int) -> list[str]:
        """A decoder-only model's output starts with the prompt (image tokens and text), which
        is cut off; an encoder-decoder's does not."""
        if self.model.config.use_decoder_only_language_model:
            output_ids = output_ids[:, prompt_length:]
        texts = self.processor.batch_decode(output_ids.cpu(), skip_special_tokens=True)
        return [text.strip() for text in texts]

    def generate(self, pixels: Sequence[ModelPixels], prompt: str) -> list[str]:
        """Captions (the kept ones, under CapFilt) for one micro-batch."""
        return [annotation.text for annotation in self.annotate(pixels, prompt)]

    def annotate(
        self, pixels: Sequence[ModelPixels], prompt: str, earlier: Sequence[Results] = ()
    ) -> list[Annotation]:
        """The runtime interface: one micro-batch's captions as annotations (built on
        no other kind's results)."""
        return self.annotate_prompts(pixels, [prompt])[0]

    def annotate_prompts(
        self, pixels: Sequence[ModelPixels], prompts: Sequence[str]
    ) -> list[list[Annotation]]:
        """Annotations per prompt, then per image, from one vision pass over the micro-batch.
        On CUDA out-of-memory (a longer prompt than the start-up probe saw) the batch is
        split in two and the smaller size kept from then on."""
        try:
            with torch.inference_mode():
                return self._annotate_prompts(pixels, prompts)
        except torch.OutOfMemoryError:
            if len(pixels) == 1:
                raise
            torch.cuda.empty_cache()
            half = (len(pixels) + 1) // 2
            self.batch_size = min(self.batch_size, half)
            log.warning("CUDA out of memory at batch %d; micro-batches now %d", len(pixels), half)
            first = self.annotate_prompts(pixels[:half], prompts)
            second = self.annotate_prompts(pixels[half:], prompts)
            return [a + b for a, b in zip(first, second, strict=True)]

    def _annotate_prompts(
        self, pixels: Sequence[ModelPixels], prompts: Sequence[str]
    ) -> list[list[Annotation]]:
        encoded = self.encode(self._normalize(pixels))
        scorer_embeds: torch.Tensor | None = None
        if self.scorer is not None:
            scorer_embeds = (
                encoded.image_embeds if self.shares_vision else self.scorer.image_embeds(pixels)
            )
        greedy = self._greedy(encoded.language_inputs, prompts)
        results: list[list[Annotation]] = []
        for prompt, captions in zip(prompts, greedy, strict=True):
            if self.scorer is None or scorer_embeds is None:
                results.append([Annotation(text) for text in captions])
                continue
            samples = self._samples(encoded.language_inputs, pixels, prompt)
            proposals = [[text, *more] for text, more in zip(captions, samples, strict=True)]
            scores = self.scorer.score(scorer_embeds, proposals)
            results.append(
                [
                    best_of(texts, found, self.scorer.name)
                    for texts, found in zip(proposals, scores, strict=True)
                ]
            )
        return results

    def _greedy(self, language_inputs: torch.Tensor, prompts: Sequence[str]) -> list[list[str]]:
        """Captions per prompt, then per image: every (prompt, image) pair in one generate()
        call, prompts padded to one length (a bigger batch keeps the device busier)."""
        input_ids, attention_mask = self._prompt_ids(*prompts)
        count = language_inputs.shape[0]
        texts = self._decode(
            self._generate(
                language_inputs.repeat(len(prompts), 1, 1),
                input_ids.repeat_interleave(count, dim=0),
                attention_mask.repeat_interleave(count, dim=0),
                self._generate_options,
            ),
            input_ids.shape[1],
        )
        return [texts[p * count : (p + 1) * count] for p in range(len(prompts))]

    def _samples(
        self, language_inputs: torch.Tensor, pixels: Sequence[ModelPixels], prompt: str
    ) -> list[list[str]]:
        """`candidates - 1` nucleus samples per image, all images in one generate() call,
        each row drawing from its own generator seeded by the image's pixels and the prompt:
        the same image gets the same candidates in any batch, job or worker."""
        count = self.candidates - 1
        if count == 0:
            return [[] for _ in pixels]
        seeds = [
            sample_seed(image, prompt) + n for image in pixels for n in range(count)
        ]
        input_ids, attention_mask = self._prompt_ids(prompt)
        rows = len(seeds)
        output = self._generate(
            language_inputs.repeat_interleave(count, dim=0),
            input_ids.repeat(rows, 1),
            attention_mask.repeat(rows, 1),
            {
                **self._generate_options,
                "num_beams": 1,
                "logits_processor": LogitsProcessorList([
                    SeededNucleusSampling(seeds, self._top_p, self._temperature, self.device)
                ]),
            },
        )
        texts = self._decode(output, input_ids.shape[1])
        return [texts[i * count : (i + 1) * count] for i in range(len(pixels))]

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


class SeededNucleusSampling(LogitsProcessor):
    """Nucleus sampling (temperature, then the smallest set of tokens holding `top_p` of the
    probability) with one generator per row, so a row's draws depend on its seed alone. It
    returns the drawn token as the only finite logit, for greedy search to take: HF's own
    sampling draws every row from one global generator, so a row's result would depend on
    what else shares its batch."""

    def __init__(
        self, seeds: Sequence[int], top_p: float, temperature: float, device: torch.device
    ) -> None:
        self._generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self._top_p = top_p
        self._temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self._temperature, dim=-1)
        ranked, order = probs.sort(dim=-1, descending=True)
        outside = ranked.cumsum(dim=-1) - ranked > self._top_p  # the top token always stays
        ranked = ranked.masked_fill(outside, 0.0)
        picks = torch.stack([
            torch.multinomial(row, 1, generator=generator)
            for row, generator in zip(ranked, self._generators, strict=True)
        ])
        tokens = order.gather(-1, picks)
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)


def sample_seed(pixels: ModelPixels, prompt: str) -> int:
    """A seed from the image's model pixels and the prompt: reproducible per image."""
    digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes())
    digest.update(prompt.encode())
    return int.from_bytes(digest.digest()[:8], "big") >> 1


def best_of(texts: Sequence[str], scores: Sequence[Score], scorer: str) -> Annotation:
    """The caption with the highest match probability (the first, greedy, on a tie), with
    every candidate when there was more than one."""
    best = max(range(len(texts)), key=lambda i: (scores[i].match, -i))
    candidates = tuple(
        Candidate(text, score.match, score.cosine)
        for text, score in zip(texts, scores, strict=True)
    ) if len(texts) > 1 else ()
    return Annotation(
        texts[best],
        scorer=scorer,
        match_probability=scores[best].match,
        itc_cosine=scores[best].cosine,
        candidates=candidates,
    )
