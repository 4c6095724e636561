"""The BLIP-2 runtime: loaded once per worker process, then preprocess -> predict -> postprocess.

Each step is a plain method so it can be tested alone (LitServe's shape). `caption()` runs
the three over micro-batches of `settings.batch_size`.

`tiny-random-blip2` is a BLIP-2 built in-process with the real transformers classes and
tiny random weights, saved with `save_pretrained` and loaded back through the same
`from_pretrained` path as a real checkpoint, so tests and offline demos exercise the code
production runs. Its captions are noise.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.constants import is_offline_mode
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BitsAndBytesConfig,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
)
from transformers.utils import logging as hf_logging

from captioning.errors import ModelLoadError
from captioning.settings import Quantization, Settings
from workers.pixels import ModelPixels, Normalizer, PixelSpec, to_model_pixels

log = logging.getLogger(__name__)

TINY_MODEL = "tiny-random-blip2"
PLACEHOLDER_NOTICE = (
    f"CAPTIONER_MODEL={TINY_MODEL} has random weights: its captions are noise, meant for tests "
    "and offline demos only. For real captions set CAPTIONER_MODEL=Salesforce/blip2-opt-2.7b "
    "(weights in the Hugging Face cache, or a local save_pretrained directory)."
)

#: The start-up batch probe stops once a batch peaks above this share of GPU memory.
MEMORY_HEADROOM = 0.8
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Single files first, then the index of a sharded checkpoint (its shards are checked too).
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

_PAD, _BOS, _EOS, _UNK, _IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
_CLS, _SEP = "[CLS]", "[SEP]"
_TINY_IMAGE_SIZE = 32
_TINY_QUERY_TOKENS = 4
_TINY_HIDDEN = 32
_TINY_INIT_STD = 0.5  # wide logits, so greedy argmax is not decided by float noise
_CAPTION_WORDS = """
a an the one two three four five several many some of on in at with by near next to under
over above below behind front inside outside top bottom left right middle side and or while
is are was sitting standing lying walking running flying swimming holding looking playing
eating drinking riding driving parked hanging floating covered filled made wearing carrying
showing smiling waiting crossing jumping sleeping reading cooking cutting posing talking
man woman person people boy girl child children baby group crowd player team family couple
dog dogs cat cats horse horses cow cows sheep bird birds duck elephant giraffe zebra bear
fish animal animals car cars truck bus train bicycle bike motorcycle boat plane airplane
street road sidewalk city building buildings house houses tower bridge park field grass tree
trees forest mountain mountains hill hills river lake water ocean sea beach sand sky cloud
clouds sun sunset snow rain light shadow table chair chairs bench bed couch sofa desk room
kitchen bathroom window door wall floor roof sign signs clock phone computer laptop screen
book books cup mug glass bottle plate bowl food pizza sandwich cake bread fruit apple apples
banana bananas orange vegetables salad coffee tea pot vase flower flowers plant plants ball
frisbee kite umbrella bag hat shirt jacket dress shoes glasses picture photo image painting
view close up black white red blue green yellow brown gray grey pink purple colorful large
small big little tall long short old young new empty full open wooden metal stone dark
bright sunny cloudy night day morning evening background foreground area scene way ground
this that there it its his her their other each together outdoors indoors alone different
what who where how many question answer describe does do kind color style
. , ? : ! ' -
"""


def build_tiny_blip2(
    directory: Path, *, text_model: Literal["opt", "t5"] = "opt", seed: int = 0
) -> Path:
    """Save a tiny random BLIP-2 (model + processor) into `directory` and return it.

    The real classes with tiny sizes: an OPT (decoder-only, like blip2-opt-*) or T5
    (encoder-decoder, like blip2-flan-t5-*) language model, a word-level tokenizer built
    offline with an `<image>` token, and weights drawn from `torch.manual_seed(seed)`.
    """
    tokenizer = tiny_tokenizer(text_model)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (_PAD, _BOS, _EOS)}
    common = {
        "vocab_size": len(tokenizer),
        "pad_token_id": ids[_PAD],
        "eos_token_id": ids[_EOS],
        "tie_word_embeddings": False,
    }
    text_config: OPTConfig | T5Config
    if text_model == "opt":
        text_config = OPTConfig(
            hidden_size=_TINY_HIDDEN,
            word_embed_proj_dim=_TINY_HIDDEN,
            ffn_dim=4 * _TINY_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=1024,  # room for a 1000-character prompt
            bos_token_id=ids[_BOS],
            init_std=_TINY_INIT_STD,
            **common,
        )
    else:
        text_config = T5Config(
            d_model=_TINY_HIDDEN,
            d_kv=_TINY_HIDDEN // 4,
            d_ff=4 * _TINY_HIDDEN,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=ids[_PAD],
            initializer_factor=_TINY_INIT_STD / 0.02,  # T5 scales its init, has no std
            **common,
        )
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=_TINY_HIDDEN,
            intermediate_size=4 * _TINY_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=_TINY_IMAGE_SIZE,
            patch_size=8,
            initializer_range=_TINY_INIT_STD,  # the default (1e-10) leaves it all zeros
        ),
        qformer_config=Blip2QFormerConfig(
            vocab_size=len(tokenizer),
            hidden_size=_TINY_HIDDEN,
            intermediate_size=4 * _TINY_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            cross_attention_frequency=1,
            max_position_embeddings=64,
            initializer_range=_TINY_INIT_STD,
        ),
        text_config=text_config,
        num_query_tokens=_TINY_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids(_IMAGE),
        initializer_range=_TINY_INIT_STD,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    # Zero-initialised queries would all read the image the same way; trained ones differ.
    torch.nn.init.normal_(model.query_tokens, std=_TINY_INIT_STD)
    image_processor = BlipImageProcessorPil(
        size={"height": _TINY_IMAGE_SIZE, "width": _TINY_IMAGE_SIZE}
    )
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=_TINY_QUERY_TOKENS)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def tiny_tokenizer(text_model: Literal["opt", "t5", "bert"]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over caption words, built in-process (nothing downloaded).

    Like the real ones, OPT's prepends a BOS and T5's appends an EOS to every text; the
    BERT-style one (the Q-Former's, in an ITM model) wraps it in [CLS] ... [SEP].
    """
    first, second = (_CLS, _SEP) if text_model == "bert" else (_BOS, _EOS)
    specials = [_PAD, first, second, _UNK]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + _CAPTION_WORDS.split()))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    single = {"opt": f"{_BOS} $A", "t5": f"$A {_EOS}", "bert": f"{_CLS} $A {_SEP}"}[text_model]
    backend.post_processor = processors.TemplateProcessing(
        single=single,
        special_tokens=[(token, vocab[token]) for token in (first, second) if token in single],
    )
    if text_model == "bert":
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, pad_token=_PAD, cls_token=_CLS, sep_token=_SEP,
            unk_token=_UNK,
        )
    # A plain special token, not `extra_special_tokens={"image_token": ...}`: Blip2Processor
    # (5.23) then calls `.content` on the str that attribute holds and fails.
    backend.add_special_tokens([AddedToken(_IMAGE, special=True, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=_PAD, bos_token=_BOS, eos_token=_EOS, unk_token=_UNK
    )


def weights_cached(model_id: str, *, cache_dir: Path | None = None) -> bool:
    """True when `model_id`'s config and all its weight files are in the local HF cache.

    Reads the cache layout only (no network), so it answers the same with HF_HUB_OFFLINE.
    """

    def cached(filename: str) -> str | None:
        path = try_to_load_from_cache(model_id, filename, cache_dir=cache_dir)
        return path if isinstance(path, str) else None

    if cached("config.json") is None:
        return False
    if any(cached(name) for name in _WEIGHT_FILES):
        return True
    for index_name in _WEIGHT_INDEXES:
        index = cached(index_name)
        if index is not None:
            shards = set(json.loads(Path(index).read_text())["weight_map"].values())
            return all(cached(shard) for shard in shards)
    return False


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
        if self.pixel_spec.size != self.image_size:
            raise ModelLoadError(
                f"processor resizes to {self.pixel_spec.size}px but the vision tower of "
                f"{name!r} expects {self.image_size}px"
            )
        self.is_placeholder = name == TINY_MODEL
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
        """Load `settings.model` (HF id, local directory or TINY_MODEL) onto its device.

        Raises ModelLoadError with what to do about it; the worker cannot start without it.
        """
        hf_logging.disable_progress_bar()  # per-shard bars are noise in a worker's log
        device = _device(settings.device)
        dtype = _DTYPES[settings.dtype] if settings.dtype else _default_dtype(device)
        if settings.model == TINY_MODEL:
            log.warning(PLACEHOLDER_NOTICE)
            with tempfile.TemporaryDirectory(prefix="tiny-blip2-") as tmp:
                source = str(build_tiny_blip2(Path(tmp)))
                return cls._from_pretrained(settings, source, device, dtype, local_only=True)
        source, local_only = _resolve_source(settings.model)
        return cls._from_pretrained(settings, source, device, dtype, local_only=local_only)

    @classmethod
    def _from_pretrained(
        cls,
        settings: Settings,
        source: str,
        device: torch.device,
        dtype: torch.dtype,
        *,
        local_only: bool,
    ) -> CaptionModel:
        """The one loading path for every kind of model; attention defaults to SDPA where
        the architecture supports it (transformers picks it, falling back to eager)."""
        quantization = quantization_config(settings.quantization, device)
        try:
            processor = Blip2Processor.from_pretrained(source, local_files_only=local_only)
            if quantization is None:
                model = Blip2ForConditionalGeneration.from_pretrained(
                    source, dtype=dtype, local_files_only=local_only
                ).to(device)
            else:  # bitsandbytes places the quantized weights itself
                model = Blip2ForConditionalGeneration.from_pretrained(
                    source,
                    dtype=dtype,
                    local_files_only=local_only,
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

    def caption_pixels(self, pixels: Sequence[ModelPixels], prompt: str) -> list[str]:
        """Captions for `pixels`, in order, in micro-batches of `batch_size`."""
        captions: list[str] = []
        start = 0
        while start < len(pixels):
            size = self.batch_size
            captions.extend(self.generate(pixels[start : start + size], prompt))
            start += size
        return captions

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


def quantization_config(mode: Quantization, device: torch.device) -> BitsAndBytesConfig | None:
    """bitsandbytes 8/4-bit loading: CUDA only, and only where bitsandbytes is installed."""
    if mode == "none":
        return None
    if device.type != "cuda":
        raise ModelLoadError(
            f"CAPTIONER_QUANTIZATION={mode} needs a CUDA device (bitsandbytes); this worker "
            f"runs on {device}"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"CAPTIONER_QUANTIZATION={mode} needs bitsandbytes: pip install bitsandbytes"
        )
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)


def _device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ModelLoadError(f"CAPTIONER_DEVICE={requested!r} is not a torch device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"CAPTIONER_DEVICE={requested!r} but CUDA is not available to torch here; "
            "unset it (auto) or use cpu"
        )
    return device


def _default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPU (what BLIP-2 checkpoints are published in), fp32 where fp16 is slow."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _resolve_source(model: str, *, setting: str = "CAPTIONER_MODEL") -> tuple[str, bool]:
    """(what to pass to from_pretrained, local files only?) for an id or a directory.

    A cached id loads without touching the network, so a worker restarts during a Hub
    outage; an uncached one downloads unless offline mode is on.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path), True
    if model.startswith(("/", ".", "~")):
        raise ModelLoadError(
            f"{setting}={model!r} looks like a path but is not a directory; point it "
            "at a directory written by save_pretrained(), or use a Hugging Face id"
        )
    if weights_cached(model):
        return model, True
    if _offline():
        raise ModelLoadError(
            f"{setting}={model!r} is not in the local Hugging Face cache and offline "
            f"mode is on (HF_HUB_OFFLINE); download it first (`hf download {model}`), "
            f"or point {setting} at a local save_pretrained() directory"
        )
    return model, False


def _offline() -> bool:
    """huggingface_hub reads HF_HUB_OFFLINE once at import; honour it when set later too."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return is_offline_mode() or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}
