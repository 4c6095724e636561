"""The ITM scorer on tiny random Blip2ForImageTextRetrieval models: real classes, real loading
path, checked against a reference computation on the model's own weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from captioning.settings import Settings
from workers.pixels import ModelPixels
from workers.runtimes.blip2 import CaptionModel
from workers.runtimes.itm import ScoreModel, match_probability, vision_digest
from workers.runtimes.tiny import TINY_MODEL, TINY_SCORER, TINY_SCORER_OWN_VIT, build_tiny_itm

CAPTIONS = [
    ["a dog on the grass", "two cats sitting on a red sofa", "a plane in the sky"],
    ["a man riding a horse near the river"],
    ["a bowl of fruit", "a black and white photo of a city street at night"],
]


def three_images() -> list[ModelPixels]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]


@pytest.fixture(scope="module")
def scorer() -> ScoreModel:
    return ScoreModel.load(Settings(scorer=TINY_SCORER, device="cpu"))


def reference_scores(
    model: nn.Module, tokenizer: object, pixels: ModelPixels, caption: str, scorer: ScoreModel
) -> tuple[float, float]:
    """One (image, caption) pair through the plain transformers forward: ITM logits with one
    softmax (not the docs' two, transformers#38514), and the ITC cosine written out here."""
    pixel_values = scorer._normalize([pixels])
    tokens = tokenizer([caption], return_tensors="pt")
    itm = model(pixel_values=pixel_values, **tokens, use_image_text_matching_head=True)
    probability = torch.softmax(itm.logits_per_image, dim=1)[0, 1].item()
    # ITC by hand: queries read the image, [CLS] reads the caption, best cosine over queries.
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    queries = model.qformer(
        query_embeds=model.query_tokens, encoder_hidden_states=image_embeds
    ).last_hidden_state
    text = model.qformer(
        query_embeds=model.embeddings(input_ids=tokens["input_ids"]),
        attention_mask=tokens["attention_mask"], query_length=0,
    ).last_hidden_state[:, 0]
    image_features = model.vision_projection(queries)[0]
    text_features = model.text_projection(text)[0]
    cosine = max(
        nn.functional.cosine_similarity(query, text_features, dim=0).item()
        for query in image_features
    )
    itc = model(pixel_values=pixel_values, **tokens, use_image_text_matching_head=False)
    assert itc.logits_per_image[0, 0].item() == pytest.approx(cosine, abs=1e-5)
    return probability, cosine


@torch.inference_mode()
def test_scores_match_a_reference_computation_on_the_tiny_weights(scorer: ScoreModel) -> None:
    pixels = three_images()
    scores = scorer.score(scorer.image_embeds(pixels), CAPTIONS)
    assert [len(group) for group in scores] == [len(group) for group in CAPTIONS]
    seen = []
    for image, captions, got in zip(pixels, CAPTIONS, scores, strict=True):
        for caption, score in zip(captions, got, strict=True):
            match, cosine = reference_scores(scorer.model, scorer.tokenizer, image, caption, scorer)
            assert score.match == pytest.approx(match, abs=1e-5)
            assert score.cosine == pytest.approx(cosine, abs=1e-5)
            seen.append(score.match)
    # A softmax of probabilities (the documented mistake) can only land in (0.27, 0.73).
    assert any(not 0.27 < match < 0.73 for match in seen)


def test_match_probability_is_one_softmax() -> None:
    logits = torch.tensor([[0.0, 4.0], [3.0, -3.0]])
    probability = match_probability(logits)
    assert probability.tolist() == pytest.approx([1 / (1 + np.exp(-4.0)), 1 / (1 + np.exp(6.0))])
    twice = logits.softmax(dim=1).softmax(dim=1)[:, 1]  # the documented example's mistake
    assert twice.tolist() == pytest.approx([0.72, 0.27], abs=0.01)


def test_a_scorer_without_captions_returns_empty_groups(scorer: ScoreModel) -> None:
    embeds = scorer.image_embeds(three_images()[:2])
    assert scorer.score(embeds, [[], []]) == [[], []]


def test_tiny_scorers_share_the_captioners_vision_tower_or_not(tmp_path: Path) -> None:
    captioner = CaptionModel.load(Settings(model=TINY_MODEL, device="cpu", max_new_tokens=4))
    digest = vision_digest(captioner.model.vision_model, captioner.pixel_spec)
    shared = ScoreModel.load(Settings(scorer=TINY_SCORER, device="cpu"))
    own = ScoreModel.load(Settings(scorer=TINY_SCORER_OWN_VIT, device="cpu"))
    assert shared.vision_digest == digest
    assert own.vision_digest != digest
    # A local save_pretrained directory loads through the same path, to the same weights.
    local = ScoreModel.load(
        Settings(scorer=str(build_tiny_itm(tmp_path / "itm", share_vision=True)), device="cpu")
    )
    assert local.vision_digest == digest


def test_the_digest_follows_the_weights_not_the_name() -> None:
    scorer = ScoreModel.load(Settings(scorer=TINY_SCORER, device="cpu"))
    before = vision_digest(scorer.model.vision_model, scorer.pixel_spec)
    with torch.no_grad():
        scorer.model.vision_model.post_layernorm.bias[0] += 1e-3
    assert vision_digest(scorer.model.vision_model, scorer.pixel_spec) != before
