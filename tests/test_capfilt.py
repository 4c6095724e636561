"""Captioner + ITM scorer on tiny models: one vision pass shared when the ViT weights match,
the same numbers as running the two models apart, CapFilt best-of-K, several prompts."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from captioning.settings import Settings
from workers.pixels import ModelPixels
from workers.runtimes.blip2 import CaptionModel
from workers.runtimes.itm import ScoreModel
from workers.runtimes.tiny import TINY_MODEL, TINY_SCORER, TINY_SCORER_OWN_VIT, build_tiny_blip2

QUESTION = "Question: what is in the picture? Answer:"


def images(count: int, seed: int = 3) -> list[ModelPixels]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(count)]


def load(**overrides: object) -> CaptionModel:
    fields: dict[str, object] = {"model": TINY_MODEL, "device": "cpu", "max_new_tokens": 6,
                                 **overrides}
    return CaptionModel.load(Settings(**fields))


class VisionCalls:
    """Counts forward passes of a vision tower (a real forward hook on the real module)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self._handle = module.register_forward_hook(self._seen)

    def _seen(self, *_: object) -> None:
        self.count += 1


@pytest.fixture(scope="module")
def plain() -> CaptionModel:
    return load()


@pytest.mark.parametrize("text_model", ["opt", "t5"])
@torch.inference_mode()
def test_generation_from_encoded_queries_equals_transformers_generate(
    text_model: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = build_tiny_blip2(tmp_path_factory.mktemp(text_model), text_model=text_model)
    model = load(model=str(directory))
    for prompt in ("", QUESTION):
        inputs = model.preprocess(images(4), prompt)
        reference = model.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.predict(inputs), reference)


@pytest.mark.parametrize("scorer_name", [TINY_SCORER, TINY_SCORER_OWN_VIT])
def test_scores_equal_running_the_two_models_apart(
    scorer_name: str, plain: CaptionModel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="workers.runtimes.blip2"):
        scored = load(scorer=scorer_name)
    shared = scorer_name == TINY_SCORER
    assert scored.shares_vision is shared
    said = "one vision pass per image feeds both" if shared else "each image runs both"
    assert said in caplog.text

    pixels = images(5)
    calls = VisionCalls(scored.model.vision_model)
    assert scored.scorer is not None
    scorer_calls = VisionCalls(scored.scorer.model.vision_model)
    annotations = scored.annotate(pixels, QUESTION)
    assert (calls.count, scorer_calls.count) == (1, 0 if shared else 1)

    # Apart: the captioner alone, then a separately loaded scorer on its own vision pass.
    captions = plain.generate(pixels, QUESTION)
    alone = ScoreModel.load(Settings(scorer=scorer_name, device="cpu"))
    scores = alone.score(alone.image_embeds(pixels), [[c] for c in captions])
    assert [a.text for a in annotations] == captions
    for annotation, (score,) in zip(annotations, scores, strict=True):
        assert annotation.match_probability == pytest.approx(score.match, abs=1e-6)
        assert annotation.itc_cosine == pytest.approx(score.cosine, abs=1e-6)
        assert annotation.candidates == ()


def test_capfilt_keeps_the_best_of_k_reproducibly(plain: CaptionModel) -> None:
    capfilt = load(scorer=TINY_SCORER, candidates=4, temperature=1.5)
    pixels = images(6)
    calls = VisionCalls(capfilt.model.vision_model)
    first = capfilt.annotate(pixels, "")
    assert calls.count == 1  # four candidates per image, one vision pass for the batch
    greedy = plain.generate(pixels, "")
    for annotation, greedy_text in zip(first, greedy, strict=True):
        texts = [c.text for c in annotation.candidates]
        assert len(texts) == 4 and texts[0] == greedy_text
        best = max(annotation.candidates, key=lambda c: c.match_probability)
        assert annotation.match_probability == best.match_probability
        assert annotation.text in texts
    assert any(len({c.text for c in a.candidates}) > 1 for a in first)  # sampling varies
    # Seeded per image: the same images in another order and batch give the same result.
    # (Scores agree to float noise: another batch pads the captions to another length.)
    again = capfilt.annotate(pixels[::-1][:3], "") + capfilt.annotate(pixels[::-1][3:], "")
    for before, after in zip(first, again[::-1], strict=True):
        assert [c.text for c in after.candidates] == [c.text for c in before.candidates]
        assert after.text == before.text
        assert after.match_probability == pytest.approx(before.match_probability, abs=1e-5)
    # The sampling settings are honoured: other settings, other candidates.
    other = load(scorer=TINY_SCORER, candidates=4, temperature=1.5, top_p=0.3)
    assert [a.candidates for a in other.annotate(pixels, "")] != [a.candidates for a in first]


def test_several_prompts_share_one_vision_pass(plain: CaptionModel) -> None:
    scored = load(scorer=TINY_SCORER, candidates=2)
    pixels = images(3)
    prompts = ["", QUESTION, "a photo of"]
    calls = VisionCalls(scored.model.vision_model)
    together = scored.annotate_prompts(pixels, prompts)
    assert calls.count == 1
    assert together == [scored.annotate(pixels, prompt) for prompt in prompts]
    assert [[a.candidates[0].text for a in row] for row in together] == [
        plain.generate(pixels, prompt) for prompt in prompts
    ]


def test_candidates_need_a_scorer() -> None:
    with pytest.raises(ValidationError, match="CAPTIONER_CANDIDATES > 1 needs CAPTIONER_SCORER"):
        Settings(candidates=3)
