"""The WD14 tagger runtime: preprocessing pixel-exact against the taggers' own recipe, the
thresholds, and the tiny ONNX twin loaded through the same code as a real checkpoint."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.errors import ModelLoadError
from captioning.settings import Settings
from tests.test_model import five_images, write_cache_file
from workers.images import decode_image
from workers.runtimes.loading import weights_cached
from workers.runtimes.tiny import TAGGER_NOTICE, TINY_TAGGER, build_tiny_wd14, write_tag_list
from workers.runtimes.wd14 import (
    TAGGER_FILES,
    Tagger,
    TagList,
    Thresholds,
    model_input,
    select_tags,
    square_pixels,
    tags_caption,
)

LIMIT = 20_000_000


def reference_prepare(image: Image.Image, target_size: int) -> np.ndarray:
    """The taggers' preprocessing as their scripts write it (SmilingWolf's wd-tagger space):
    RGBA composited on white, centred on a white square, bicubic resize, float32, RGB->BGR,
    a batch of one."""
    canvas = Image.new("RGBA", image.size, (255, 255, 255))
    canvas.alpha_composite(image.convert("RGBA"))
    image = canvas.convert("RGB")
    max_dim = max(image.size)
    pad_left = (max_dim - image.size[0]) // 2
    pad_top = (max_dim - image.size[1]) // 2
    padded = Image.new("RGB", (max_dim, max_dim), (255, 255, 255))
    padded.paste(image, (pad_left, pad_top))
    if max_dim != target_size:
        padded = padded.resize((target_size, target_size), Image.BICUBIC)
    array = np.asarray(padded, dtype=np.float32)
    array = array[:, :, ::-1]
    return np.expand_dims(array, axis=0)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def odd_images() -> dict[str, Image.Image]:
    """Wide, tall, square, translucent, palette with a transparent index, grey."""
    rgba = Image.merge("RGBA", (
        Image.linear_gradient("L"), Image.radial_gradient("L"),
        Image.linear_gradient("L").rotate(90), Image.radial_gradient("L").rotate(45),
    )).resize((90, 37))
    palette = Image.effect_mandelbrot((41, 77), (-2.0, -1.2, 0.8, 1.2), 60).convert("P")
    palette.info["transparency"] = 0
    return {
        **{f"photo{i}": image for i, image in enumerate(five_images())},
        "rgba": rgba,
        "palette": palette,
        "grey": Image.linear_gradient("L").resize((33, 61)),
        "tiny": Image.new("RGB", (3, 1), (10, 200, 30)),
    }


@pytest.mark.parametrize("size", [32, 448])
def test_preprocessing_is_pixel_exact(size: int) -> None:
    """Decode (the worker's path, at the full resolution a tagger asks for) + square pixels +
    batch == the reference, to the bit."""
    for name, image in odd_images().items():
        decoded = decode_image(png(image), max_pixels=LIMIT, target_size=None).image
        ours = model_input([square_pixels(decoded, size)])
        reference = reference_prepare(image, size)
        assert ours.dtype == reference.dtype == np.float32, name
        assert ours.shape == reference.shape == (1, size, size, 3), name
        assert np.array_equal(ours, reference), name


def test_batch_is_bgr_nhwc_float() -> None:
    red = square_pixels(Image.new("RGB", (4, 2), (255, 0, 0)), 4)
    batch = model_input([red, red])
    assert batch.shape == (2, 4, 4, 3) and batch.flags.c_contiguous
    assert batch[0, 2, 0].tolist() == [0.0, 0.0, 255.0]  # a red pixel, channels reversed
    assert batch[0, 0, 0].tolist() == [255.0, 255.0, 255.0]  # white padding above


def tag_list(tmp_path: Path) -> TagList:
    tags = (("general", 9), ("explicit", 9), ("long_hair", 0), ("^_^", 0), ("smile", 0),
            ("star_(sky)", 0), ("hatsune_miku", 4), ("kirby", 4))
    return TagList.read(write_tag_list(tags, tmp_path / "selected_tags.csv"))


def test_thresholds_rating_and_caption(tmp_path: Path) -> None:
    tags = tag_list(tmp_path)
    probs = np.array([0.8, 0.1, 0.35, 0.9, 0.5, 0.36, 0.86, 0.85], dtype=np.float32)
    selected = select_tags(probs, tags, Thresholds(general=0.35, character=0.85))
    assert selected["rating"] == {"general": 0.8, "explicit": 0.1}
    # strictly above the threshold (0.35 and 0.85 are out), by falling probability
    assert list(selected["general"]) == ["^_^", "smile", "star (sky)"]
    assert selected["character"] == {"hatsune miku": 0.86}
    assert tags_caption(selected) == "hatsune miku, ^_^, smile, star (sky)"
    stricter = select_tags(probs, tags, Thresholds(general=0.6, character=0.9))
    assert stricter["general"] == {"^_^": 0.9} and stricter["character"] == {}
    assert tags_caption(stricter) == "^_^"


def test_tag_list_needs_its_columns(tmp_path: Path) -> None:
    (tmp_path / "selected_tags.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ModelLoadError, match=r"selected_tags\.csv"):
        TagList.read(tmp_path / "selected_tags.csv")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_wd14(tmp_path_factory.mktemp("wd14"))


def load(model: str, **overrides: object) -> Tagger:
    return Tagger.load(Settings(tagger_model=model, device="cpu", **overrides))


def test_tiny_twin_loads_like_a_checkpoint_directory(tiny_dir: Path) -> None:
    tagger = load(str(tiny_dir))
    assert not tagger.is_placeholder  # a directory is the operator's model
    assert tagger.image_size == 32
    assert tagger.session.get_inputs()[0].shape[0] == "batch"  # dynamic, like the real ones
    assert len(tagger.tags.names) == tagger.session.get_outputs()[0].shape[-1]
    pixels = [tagger.to_pixels(image) for image in five_images()]
    batched = tagger.annotate(pixels, "")
    one_by_one = [tagger.annotate([p], "")[0] for p in pixels]
    assert [a.text for a in batched] == [a.text for a in one_by_one]
    for a, b in zip(batched, one_by_one, strict=True):
        assert a.tags is not None and b.tags is not None
        assert a.tags.keys() == b.tags.keys()
        assert np.allclose(list(a.tags["rating"].values()), list(b.tags["rating"].values()),
                           atol=2e-4)
    assert len({a.text for a in batched}) > 1, "tags should depend on the image"
    assert all(set(a.tags or {}) == {"rating", "character", "general"} for a in batched)


def test_tiny_twin_by_name_is_a_flagged_placeholder(caplog: pytest.LogCaptureFixture) -> None:
    tagger = load(TINY_TAGGER, tagger_batch_size=2)
    assert TAGGER_NOTICE in caplog.text and "SmilingWolf/wd-vit-tagger-v3" in TAGGER_NOTICE
    assert tagger.is_placeholder and tagger.name == TINY_TAGGER
    assert tagger.batch_size == 2
    again = load(TINY_TAGGER)
    pixels = [tagger.to_pixels(image) for image in five_images()]
    assert [a.text for a in tagger.annotate(pixels, "")] == [
        a.text for a in again.annotate(pixels, "")
    ]


def assert_fails_fast(model: str, match: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=match):
        load(model)
    assert time.perf_counter() - start < 5


def test_a_directory_without_the_tag_list(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes((tiny_dir / "model.onnx").read_bytes())
    assert_fails_fast(str(tmp_path), "selected_tags.csv")


def test_a_tag_list_that_does_not_match_the_model(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes((tiny_dir / "model.onnx").read_bytes())
    write_tag_list((("general", 9), ("smile", 0)), tmp_path / "selected_tags.csv")
    assert_fails_fast(str(tmp_path), "lists 2")


def test_missing_directory_and_uncached_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert_fails_fast(str(tmp_path / "nope"), "not a directory")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_fails_fast("captioner-tests/no-such-tagger", "not in the local Hugging Face cache")


def test_a_tagger_is_cached_when_both_its_files_are(tmp_path: Path) -> None:
    repo = "org/wd-test-tagger"
    write_cache_file(tmp_path, repo, "model.onnx", "weights")
    assert not weights_cached(repo, cache_dir=tmp_path, files=TAGGER_FILES)
    write_cache_file(tmp_path, repo, "selected_tags.csv", "tag_id,name,category,count\n")
    assert weights_cached(repo, cache_dir=tmp_path, files=TAGGER_FILES)
    assert not weights_cached(repo, cache_dir=tmp_path)  # not a transformers checkpoint
