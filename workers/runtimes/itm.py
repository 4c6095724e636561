"""BLIP-2's own filter: image-text matching (ITM) and contrastive (ITC) scores for captions.

`Blip2ForImageTextRetrieval` (Salesforce/blip2-itm-vit-g) reads a caption with its Q-Former
while the queries attend to the image: the ITM head says whether they match (two logits:
no, yes), and the ITC projections give a cosine similarity. Here both are computed from the
vision tower's output (`image_embeds`) rather than from pixels, so a worker whose captioner
carries the same frozen ViT (same weight digest) runs it once per image for both models,
and K candidate captions of one image cost one vision pass, not K.

The match probability is one softmax over the ITM logits. The transformers docs example
applies softmax twice, which squeezes every probability towards 0.5 (transformers#38514).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    PreTrainedTokenizerBase,
)

from captioning.settings import Settings
from workers.pixels import ModelPixels, Normalizer, PixelSpec
from workers.runtimes import loading

log = logging.getLogger(__name__)

#: Caption tokens the ITM model reads (LAVIS' BLIP-2 matching uses 35); longer ones are cut.
MAX_TEXT_TOKENS = 35


@dataclass(frozen=True)
class Score:
    """How well one caption fits its image, by the scorer model."""

    match: float  # ITM: probability that the caption describes the image, 0..1
    cosine: float  # ITC: cosine of image and caption embeddings, -1..1 (best query token)


def match_probability(itm_logits: torch.Tensor) -> torch.Tensor:
    """(N, 2) ITM logits (no, yes) -> (N,) probability of "yes": one softmax, once."""
    return itm_logits.float().softmax(dim=-1)[:, 1]


def vision_digest(vision_model: nn.Module, spec: PixelSpec) -> str:
    """sha256 of a vision tower's weights (names, dtypes, shapes, bytes) and the pixels it
    is fed: equal digests mean one forward pass serves both models, whatever they are called."""
    digest = hashlib.sha256(repr(spec).encode())
    for name, tensor in sorted(vision_model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ScoreModel:
    """One Blip2ForImageTextRetrieval and its tokenizer on one device."""

    def __init__(
        self,
        *,
        name: str,
        model: Blip2ForImageTextRetrieval,
        tokenizer: PreTrainedTokenizerBase,
        pixel_spec: PixelSpec,
        dtype: torch.dtype,
    ) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.pixel_spec = pixel_spec
        self.device: torch.device = model.device
        self.dtype = dtype
        self._normalize = Normalizer(pixel_spec, self.device, dtype)
        self.vision_digest = vision_digest(model.vision_model, pixel_spec)

    @classmethod
    def load(cls, settings: Settings) -> ScoreModel:
        """Load `settings.scorer` (HF id, local directory or tiny twin) by the captioner's
        rules: same device, dtype and cache. Raises ModelLoadError saying what to do."""
        assert settings.scorer is not None
        loaded = loading.load_pretrained(
            settings.scorer, setting="CAPTIONER_SCORER", what="ITM scorer",
            processor_class=Blip2Processor, model_class=Blip2ForImageTextRetrieval,
            device_name=settings.device, dtype_name=settings.dtype,
        )
        processor, model, dtype = loaded.processor, loaded.model, loaded.dtype
        processor.tokenizer.padding_side = "right"  # ITC reads the first ([CLS]) position
        spec = PixelSpec.from_processor(processor.image_processor)
        return cls(name=settings.scorer, model=model, tokenizer=processor.tokenizer,
                   pixel_spec=spec, dtype=dtype)

    @torch.inference_mode()
    def image_embeds(self, pixels: Sequence[ModelPixels]) -> torch.Tensor:
        """This model's own vision pass (when its tower is not the captioner's)."""
        return self.model.vision_model(pixel_values=self._normalize(pixels)).last_hidden_state

    @torch.inference_mode()
    def score(
        self, image_embeds: torch.Tensor, captions: Sequence[Sequence[str]]
    ) -> list[list[Score]]:
        """Scores of `captions[i]` (any number) against image i, whose vision tower output is
        `image_embeds[i]`; every caption of every image in one Q-Former batch."""
        owner = [i for i, texts in enumerate(captions) for _ in texts]
        texts = [text for group in captions for text in group]
        if not texts:
            return [[] for _ in captions]
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS,
            return_tensors="pt",
        ).to(self.device)
        index = torch.tensor(owner, device=image_embeds.device)
        image_embeds = image_embeds.to(self.device)
        matches = match_probability(
            self._itm_logits(image_embeds[index], tokens["input_ids"], tokens["attention_mask"])
        )
        cosines = self._itc_cosines(image_embeds, index, tokens["input_ids"],
                                    tokens["attention_mask"])
        scores: list[list[Score]] = [[] for _ in captions]
        for i, match, cosine in zip(owner, matches.tolist(), cosines.tolist(), strict=True):
            scores[i].append(Score(match=match, cosine=cosine))
        return scores

    def _itm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The ITM branch of Blip2ForImageTextRetrieval.forward, from vision output on."""
        model = self.model
        queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=self.device)
        hidden = model.qformer(
            query_embeds=model.embeddings(input_ids=input_ids, query_embeds=queries),
            query_length=queries.shape[1],
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=_all_visible(image_embeds),
            return_dict=True,
        ).last_hidden_state
        hidden = hidden.to(model.itm_head.weight.dtype)
        return model.itm_head(hidden[:, : queries.shape[1], :]).mean(dim=1)

    def _itc_cosines(
        self,
        image_embeds: torch.Tensor,
        index: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The ITC branch: each image's query features once, each caption's [CLS] feature,
        the best cosine over the queries for every (image, caption) pair."""
        model = self.model
        queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        image_hidden = model.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=_all_visible(image_embeds),
            return_dict=True,
        ).last_hidden_state
        image_features = nn.functional.normalize(
            model.vision_projection(image_hidden.to(model.vision_projection.weight.dtype)), dim=-1
        )
        text_hidden = model.qformer(
            query_embeds=model.embeddings(input_ids=input_ids),
            query_length=0,
            attention_mask=attention_mask,
            return_dict=True,
        ).last_hidden_state
        text_features = nn.functional.normalize(
            model.text_projection(text_hidden[:, 0, :].to(model.text_projection.weight.dtype)),
            dim=-1,
        )
        return torch.einsum("nqd,nd->nq", image_features[index], text_features).amax(dim=-1)


def _all_visible(image_embeds: torch.Tensor) -> torch.Tensor:
    return torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
