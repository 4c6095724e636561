"""The BLIP-2 runtime on tiny random OPT and T5 models: real classes, real code path, no mocks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioning.errors import ModelLoadError
from captioning.settings import Settings
from workers.runtimes.blip2 import CaptionModel
from workers.runtimes.loading import weights_cached
from workers.runtimes.tiny import PLACEHOLDER_NOTICE, TINY_MODEL, build_tiny_blip2

QUESTION = "Question: what is in the picture? Answer:"
TEXT_MODELS = ("opt", "t5")


def five_images() -> list[Image.Image]:
    """Different content, sizes and aspect ratios; deterministic."""
    return [
        Image.effect_mandelbrot((96, 64), (-2.0, -1.2, 0.8, 1.2), 80).convert("RGB"),
        Image.linear_gradient("L").convert("RGB").resize((40, 90)),
        Image.radial_gradient("L").convert("RGB"),
        Image.new("RGB", (50, 50), (200, 30, 30)),
        Image.merge(
            "RGB",
            (
                Image.linear_gradient("L"),
                Image.radial_gradient("L"),
                Image.linear_gradient("L").rotate(90),
            ),
        ).resize((120, 30)),
    ]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        text_model: build_tiny_blip2(tmp_path_factory.mktemp(text_model), text_model=text_model)
        for text_model in TEXT_MODELS
    }


def load(directory: Path, **overrides: object) -> CaptionModel:
    fields: dict[str, object] = {"max_new_tokens": 8, "device": "cpu", **overrides}
    return CaptionModel.load(Settings(model=str(directory), **fields))


@pytest.fixture(scope="module", params=TEXT_MODELS)
def text_model(request: pytest.FixtureRequest) -> str:
    return request.param


def test_tiny_checkpoint_is_a_consistent_blip2(tiny_dirs: dict[str, Path], text_model: str) -> None:
    model = load(tiny_dirs[text_model])
    config = model.model.config
    tokenizer = model.processor.tokenizer
    assert config.model_type == "blip-2"
    assert config.image_token_index == tokenizer.convert_tokens_to_ids("<image>")
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.use_decoder_only_language_model is (text_model == "opt")
    assert model.processor.num_query_tokens == config.num_query_tokens
    assert model.image_size == model.processor.image_processor.size["height"]
    assert model.model.config._attn_implementation == "sdpa"
    assert not model.is_placeholder  # a directory is the operator's model, whatever it holds


def test_padding_side_follows_the_language_model(tiny_dirs: dict[str, Path]) -> None:
    assert load(tiny_dirs["opt"]).processor.tokenizer.padding_side == "left"
    assert load(tiny_dirs["t5"]).processor.tokenizer.padding_side == "right"


@pytest.mark.parametrize("prompt", ["", QUESTION])
def test_batched_captions_equal_one_by_one(
    tiny_dirs: dict[str, Path], text_model: str, prompt: str
) -> None:
    images = five_images()
    batched = load(tiny_dirs[text_model], batch_size=5).caption(images, prompt)
    micro = load(tiny_dirs[text_model], batch_size=2).caption(images, prompt)
    single = load(tiny_dirs[text_model], batch_size=1)
    one_by_one = [single.caption([image], prompt)[0] for image in images]
    assert batched == micro == one_by_one
    assert single.caption([], prompt) == []
    assert all(isinstance(caption, str) for caption in batched)
    assert len(set(batched)) > 1, "captions should depend on the image"


def test_mixed_prompt_lengths_pad_correctly(tiny_dirs: dict[str, Path], text_model: str) -> None:
    """Prompts of different lengths in one batch need padding: results must not change."""
    model = load(tiny_dirs[text_model])
    images = five_images()
    prompts = ["", "a photo of", QUESTION, "a dog", "the"]
    inputs = model.processor(images=images, text=prompts, padding=True, return_tensors="pt")
    assert (inputs["attention_mask"] == 0).any()
    batched = model.postprocess(model.predict(inputs), inputs)
    one_by_one = [model.caption([image], p)[0] for image, p in zip(images, prompts, strict=True)]
    assert batched == one_by_one


def test_preprocess_never_truncates_the_image_tokens(
    tiny_dirs: dict[str, Path], text_model: str
) -> None:
    model = load(tiny_dirs[text_model])
    config = model.model.config
    long_prompt = " ".join(["what is in the picture ?"] * 200)
    inputs = model.preprocess([model.to_pixels(image) for image in five_images()[:2]], long_prompt)
    assert inputs["pixel_values"].shape == (2, 3, model.image_size, model.image_size)
    image_tokens = (inputs["input_ids"] == config.image_token_index).sum(dim=1)
    assert image_tokens.tolist() == [config.num_query_tokens] * 2
    assert inputs["input_ids"].shape[1] > 1000


def test_generate_output_shape_and_postprocess(tiny_dirs: dict[str, Path], text_model: str) -> None:
    """OPT's generate() returns prompt + new ids; T5's returns decoder ids only."""
    model = load(tiny_dirs[text_model], max_new_tokens=5)
    inputs = model.preprocess([model.to_pixels(image) for image in five_images()], QUESTION)
    output = model.predict(inputs)
    prompt_length = inputs["input_ids"].shape[1]
    if text_model == "opt":
        assert output.shape[1] <= prompt_length + 5
        assert torch.equal(output[:, :prompt_length], inputs["input_ids"])
    else:
        assert output.shape[1] <= 1 + 5  # decoder start token + new tokens
    captions = model.postprocess(output, inputs)
    assert len(captions) == 5
    assert all(caption == caption.strip() for caption in captions)


def test_build_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = build_tiny_blip2(tmp_path / "a", seed=7)
    again = build_tiny_blip2(tmp_path / "b", seed=7)
    other = build_tiny_blip2(tmp_path / "c", seed=8)
    weights = "model.safetensors"
    assert (first / weights).read_bytes() == (again / weights).read_bytes()
    assert (first / weights).read_bytes() != (other / weights).read_bytes()
    images = five_images()
    assert load(first).caption(images, "") == load(again).caption(images, "")


def test_tiny_model_by_name_is_flagged_as_placeholder(caplog: pytest.LogCaptureFixture) -> None:
    model = CaptionModel.load(Settings(model=TINY_MODEL, max_new_tokens=6, device="cpu"))
    assert PLACEHOLDER_NOTICE in caplog.text
    assert model.name == TINY_MODEL
    assert model.is_placeholder
    assert model.device == torch.device("cpu")
    assert model.dtype == torch.float32
    assert model.image_size == 32
    assert "Salesforce/blip2-opt-2.7b" in PLACEHOLDER_NOTICE
    assert "noise" in PLACEHOLDER_NOTICE
    captions = model.caption(five_images(), QUESTION)
    assert len(captions) == 5
    assert all(isinstance(caption, str) for caption in captions)
    again = CaptionModel.load(Settings(model=TINY_MODEL, max_new_tokens=6, device="cpu"))
    assert again.caption(five_images(), QUESTION) == captions


def test_bfloat16(tiny_dirs: dict[str, Path]) -> None:
    model = load(tiny_dirs["opt"], dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert model.model.language_model.dtype == torch.bfloat16
    assert len(model.caption(five_images(), "")) == 5


def assert_fails_fast(settings: Settings, match: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=match):
        CaptionModel.load(settings)
    assert time.perf_counter() - start < 5


def test_missing_directory(tmp_path: Path) -> None:
    assert_fails_fast(Settings(model=str(tmp_path / "nope"), device="cpu"), "not a directory")


def test_directory_without_a_model(tmp_path: Path) -> None:
    assert_fails_fast(Settings(model=str(tmp_path), device="cpu"), "cannot load BLIP-2 model")


def test_unknown_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = Settings(model="captioner-tests/no-such-model", device="cpu")
    assert_fails_fast(settings, "not in the local Hugging Face cache")


def test_bad_device(tiny_dirs: dict[str, Path]) -> None:
    assert_fails_fast(Settings(model=str(tiny_dirs["opt"]), device="warp-drive"), "torch device")


def write_cache_file(cache: Path, repo: str, filename: str, content: str = "{}") -> None:
    """One file in huggingface_hub's cache layout (models--org--name/snapshots/<sha>/...)."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    sha = "0" * 40
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(sha)
    path = repo_dir / "snapshots" / sha / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)


def test_weights_cached(tmp_path: Path) -> None:
    repo = "org/blip2-test"
    assert not weights_cached(repo, cache_dir=tmp_path)
    write_cache_file(tmp_path, repo, "config.json")
    assert not weights_cached(repo, cache_dir=tmp_path)
    write_cache_file(tmp_path, repo, "model.safetensors", "weights")
    assert weights_cached(repo, cache_dir=tmp_path)


def test_weights_cached_needs_every_shard(tmp_path: Path) -> None:
    repo = "org/blip2-sharded"
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"weight_map": {"a.weight": shards[0], "b.weight": shards[1]}}
    write_cache_file(tmp_path, repo, "config.json")
    write_cache_file(tmp_path, repo, "model.safetensors.index.json", json.dumps(index))
    write_cache_file(tmp_path, repo, shards[0], "weights")
    assert not weights_cached(repo, cache_dir=tmp_path)
    write_cache_file(tmp_path, repo, shards[1], "weights")
    assert weights_cached(repo, cache_dir=tmp_path)


def test_static_cache_gives_the_same_captions(tiny_dirs: dict[str, Path]) -> None:
    images = five_images()
    assert load(tiny_dirs["opt"], static_cache=True).caption(images, QUESTION) == load(
        tiny_dirs["opt"]
    ).caption(images, QUESTION)


def test_quantization_is_refused_where_bitsandbytes_cannot_run(
    tiny_dirs: dict[str, Path],
) -> None:
    settings = Settings(model=str(tiny_dirs["opt"]), device="cpu", quantization="8bit")
    assert_fails_fast(settings, "needs a CUDA device")
