"""The interrogate kind: term lists, ranking on hand-made embeddings, the term embedding cache
and the CLIP runtime on its tiny random twin (real classes, real loading code, no mocks)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioning.errors import ConfigError
from captioning.settings import Settings
from workers.interrogate.ranking import RankedTerm, TermTable, fast_prompt, rank_terms
from workers.interrogate.term_cache import cache_path, term_table
from workers.interrogate.terms import SITES, TermLists, load_term_lists
from workers.runtimes.base import Annotation
from workers.runtimes.clip import ClipRuntime
from workers.runtimes.interrogate import Interrogator
from workers.runtimes.tiny import TINY_CLIP, build_tiny_clip

SAMPLES = Path(__file__).parents[1] / "captioning" / "samples"


def unit(degrees: float) -> list[float]:
    """A unit vector in the plane at `degrees`: cosine similarities are easy to read."""
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# --- term lists ---------------------------------------------------------------------------


def test_shipped_lists_are_the_originals_built_as_the_original_builds_them() -> None:
    terms = load_term_lists()
    assert terms.names == ("artists", "flavors", "mediums", "movements", "trendings")
    counts = {name: len(listed) for name, listed in terms.lists.items()}
    assert counts == {
        "artists": 2 * 5265,  # "by X" and "inspired by X"
        "flavors": 100_969,  # 100,970 lines, one blank
        "mediums": 95,
        "movements": 200,
        "trendings": 4 * len(SITES),
    }
    artists = terms.lists["artists"]
    assert artists[0] == "by A. B. Jackson"
    assert artists[5265] == "inspired by A. B. Jackson"
    assert terms.lists["flavors"][:2] == ("highly detailed", "sharp focus")
    assert "trending on Artstation" in terms.lists["trendings"]
    assert len(list(terms)) == len(terms)


def test_digest_changes_with_any_term_and_not_otherwise() -> None:
    lists = {"mediums": ("a photo", "a painting"), "flavors": ("sharp",)}
    same = TermLists(dict(lists))
    assert TermLists(lists).digest() == same.digest()
    assert TermLists({**lists, "flavors": ("sharp ",)}).digest() != same.digest()
    assert TermLists({"flavors": ("sharp",), "mediums": lists["mediums"]}).digest() != (
        same.digest()
    )


def test_an_unreadable_term_list_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "artists.txt").write_text("Hokusai\n")
    with pytest.raises(ConfigError, match=r"flavors\.txt.*CAPTIONER_TERM_LISTS_DIR"):
        load_term_lists(tmp_path)


# --- ranking ------------------------------------------------------------------------------


def hand_made_table() -> TermTable:
    terms = TermLists(
        {
            "artists": ("by near", "by far"),
            "flavors": ("f10", "f20", "f30", "f170"),
            "mediums": ("m5",),
        }
    )
    angles = [2, 120, 10, 20, 30, 170, 5]
    return TermTable(terms, torch.tensor([unit(a) for a in angles]))


def test_terms_rank_by_cosine_similarity_across_lists() -> None:
    table = hand_made_table()
    image = torch.tensor([unit(0), unit(150)])
    ranked = rank_terms(image, table, 4)
    assert [(t.term, t.list) for t in ranked[0]] == [
        ("by near", "artists"), ("m5", "mediums"), ("f10", "flavors"), ("f20", "flavors"),
    ]
    assert ranked[0][0].similarity == pytest.approx(math.cos(math.radians(2)), abs=1e-6)
    assert [t.term for t in ranked[1]] == ["f170", "by far", "f30", "f20"]


def test_more_terms_than_a_list_holds_takes_the_whole_list() -> None:
    ranked = rank_terms(torch.tensor([unit(0)]), hand_made_table(), 50)[0]
    assert len(ranked) == 7
    similarities = [t.similarity for t in ranked]
    assert similarities == sorted(similarities, reverse=True)


def test_image_embeddings_need_not_be_unit_length() -> None:
    table = hand_made_table()
    scaled = rank_terms(torch.tensor([[7.0, 0.0]]), table, 3)
    assert scaled == rank_terms(torch.tensor([unit(0)]), table, 3)


def test_per_list_ranking_picks_what_ranking_all_lists_merged_picks() -> None:
    """The original's fast mode ranks the lists merged into one table."""
    generator = torch.Generator().manual_seed(3)
    terms = TermLists({name: tuple(f"{name}{i}" for i in range(size))
                       for name, size in (("a", 40), ("b", 3), ("c", 200), ("d", 1))})
    embeddings = torch.nn.functional.normalize(torch.randn(len(terms), 8, generator=generator))
    images = torch.randn(5, 8, generator=generator)
    every_term = list(terms)
    for count in (1, 4, 32, 244):
        ranked = rank_terms(images, TermTable(terms, embeddings), count)
        similarity = torch.nn.functional.normalize(images) @ embeddings.T
        merged = similarity.topk(count, dim=-1).indices
        for row in range(len(images)):
            assert [t.term for t in ranked[row]] == [every_term[i] for i in merged[row]]


def test_a_table_must_have_one_row_per_term() -> None:
    with pytest.raises(ValueError, match="embeddings for 2 terms"):
        TermTable(TermLists({"a": ("x", "y")}), torch.zeros(3, 4))


def test_prompt_is_caption_then_terms_best_first_cut_to_the_context() -> None:
    ranked = [RankedTerm("sharp focus", "flavors", 0.3), RankedTerm("by Hokusai", "artists", 0.2),
              RankedTerm("ukiyo-e", "movements", 0.1)]
    whole = fast_prompt("a wave", ranked, fits=lambda text: True)
    assert whole.prompt == "a wave, sharp focus, by Hokusai, ukiyo-e"
    assert whole.terms == tuple(ranked)
    short = fast_prompt("a wave", ranked, fits=lambda text: len(text) <= 30)
    assert short.prompt == "a wave, sharp focus"
    assert short.terms == tuple(ranked[:1])
    # The first term that does not fit ends the prompt, as in the original.
    assert fast_prompt("a wave", ranked, fits=lambda t: "Hokusai" not in t).terms == (ranked[0],)
    assert fast_prompt("  ", ranked, fits=lambda t: True).prompt.startswith("sharp focus, by")


# --- the CLIP runtime on its tiny twin ----------------------------------------------------


@pytest.fixture(scope="module")
def clip() -> ClipRuntime:
    return ClipRuntime.load(Settings(clip_model=TINY_CLIP, device="cpu"))


def test_tiny_clip_is_placeholder_and_loads_like_a_directory(
    clip: ClipRuntime, tmp_path: Path
) -> None:
    assert clip.is_placeholder
    assert clip.context == 77
    from_directory = ClipRuntime.load(
        Settings(clip_model=str(build_tiny_clip(tmp_path / "clip")), device="cpu")
    )
    assert not from_directory.is_placeholder
    assert from_directory.identity == clip.identity  # same seed, same tokenizer
    other_seed = ClipRuntime.load(
        Settings(clip_model=str(build_tiny_clip(tmp_path / "other", seed=1)), device="cpu")
    )
    assert other_seed.identity != clip.identity


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (32, 32), (33, 90), (1000, 872)])
def test_pixels_match_the_clip_processor(clip: ClipRuntime, size: tuple[int, int]) -> None:
    image = Image.open(SAMPLES / "chelsea.png").convert("RGB").resize(size)
    expected = clip.processor(images=[image], return_tensors="pt")["pixel_values"]
    pixels = clip.to_pixels(image)
    assert pixels.shape == (32, 32, 3)
    assert torch.allclose(clip._normalize([pixels]), expected, atol=1e-5)


def test_embeddings_are_the_models_own_and_unit_length(clip: ClipRuntime) -> None:
    texts = ["a photo of a cat", "by Hokusai", "trending on Artstation " * 30]
    got = clip.encode_texts(texts)
    tokens = clip.processor.tokenizer(texts, padding=True, truncation=True, max_length=77,
                                      return_tensors="pt")
    with torch.inference_mode():
        raw = clip.model.get_text_features(**tokens).pooler_output
    assert torch.allclose(got, torch.nn.functional.normalize(raw), atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)
    image = Image.open(SAMPLES / "coffee.png").convert("RGB")
    assert clip.image_embeddings([clip.to_pixels(image)] * 2).shape == (2, 16)
    assert clip.fits(texts[0])
    assert not clip.fits(texts[2])


# --- the term embedding cache -------------------------------------------------------------


class CountingEncoder:
    """The real tiny CLIP text tower, counting the texts it encodes."""

    def __init__(self, clip: ClipRuntime) -> None:
        self.clip = clip
        self.name = clip.name
        self.encoded = 0

    @property
    def identity(self) -> str:
        return self.clip.identity

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        self.encoded += len(texts)
        return self.clip.encode_texts(texts)


SMALL_TERMS = TermLists(
    {"artists": ("by Hokusai", "inspired by Monet"), "flavors": ("sharp focus", "8k", "moody"),
     "mediums": ("a photo",), "movements": ("ukiyo-e",), "trendings": ("trending on pixiv",)}
)


def test_term_embeddings_are_computed_once_then_read(clip: ClipRuntime, tmp_path: Path) -> None:
    encoder = CountingEncoder(clip)
    first = term_table(encoder, SMALL_TERMS, tmp_path)
    assert encoder.encoded == len(SMALL_TERMS)
    files = list(tmp_path.iterdir())
    assert files == [cache_path(tmp_path, encoder, SMALL_TERMS)]
    written = files[0].stat()
    again = term_table(encoder, SMALL_TERMS, tmp_path)
    assert encoder.encoded == len(SMALL_TERMS)  # nothing encoded the second time
    assert torch.equal(again.embeddings, first.embeddings)
    assert files[0].stat().st_mtime_ns == written.st_mtime_ns
    assert torch.allclose(
        first.embeddings.float(), clip.encode_texts(list(SMALL_TERMS)), atol=1e-3
    )


def test_other_terms_or_another_model_miss_the_cache(clip: ClipRuntime, tmp_path: Path) -> None:
    encoder = CountingEncoder(clip)
    term_table(encoder, SMALL_TERMS, tmp_path)
    changed = TermLists({**SMALL_TERMS.lists, "flavors": ("sharp focus", "8k", "misty")})
    term_table(encoder, changed, tmp_path)
    assert encoder.encoded == 2 * len(SMALL_TERMS)
    other = ClipRuntime.load(
        Settings(clip_model=str(build_tiny_clip(tmp_path / "m", seed=1)), device="cpu")
    )
    other_encoder = CountingEncoder(other)
    table = term_table(other_encoder, SMALL_TERMS, tmp_path / "cache")
    assert other_encoder.encoded == len(SMALL_TERMS)
    assert not torch.allclose(
        table.embeddings, term_table(encoder, SMALL_TERMS, tmp_path).embeddings
    )
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_a_damaged_cache_file_is_recomputed(
    clip: ClipRuntime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    encoder = CountingEncoder(clip)
    expected = term_table(encoder, SMALL_TERMS, tmp_path).embeddings
    path = cache_path(tmp_path, encoder, SMALL_TERMS)
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        table = term_table(encoder, SMALL_TERMS, tmp_path)
    assert "unreadable" in caplog.text
    assert encoder.encoded == 2 * len(SMALL_TERMS)
    assert torch.equal(table.embeddings, expected)
    assert term_table(encoder, SMALL_TERMS, tmp_path) is not None
    assert encoder.encoded == 2 * len(SMALL_TERMS)  # the rewritten file is good


def test_an_unwritable_cache_dir_costs_the_next_start_not_this_one(
    clip: ClipRuntime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        table = term_table(CountingEncoder(clip), SMALL_TERMS, blocker / "cache")
    assert table.embeddings.shape == (len(SMALL_TERMS), 16)
    assert "CAPTIONER_TERM_CACHE_DIR" in caplog.text


def test_interrogator_writes_caption_then_closest_terms(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    for name, text in {"artists": "Hokusai\nMonet\n", "flavors": "sharp focus\n8k\nmoody\n",
                       "mediums": "a photo\n", "movements": "ukiyo-e\nimpressionism\n"}.items():
        (lists / f"{name}.txt").write_text(text)
    settings = Settings(clip_model=TINY_CLIP, device="cpu", term_lists_dir=lists,
                        term_cache_dir=tmp_path / "cache", interrogate_terms=3)
    interrogator = Interrogator.load(settings)
    assert interrogator.name == f"{settings.model}+{TINY_CLIP}"
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    images = [Image.open(SAMPLES / name).convert("RGB") for name in ("chelsea.png", "coffee.png")]
    pixels = [interrogator.to_pixels(image) for image in images]
    captions = [{"caption": Annotation("a cat")}, {"caption": Annotation("a cup")}]
    results = interrogator.annotate(pixels, "", captions)
    expected = rank_terms(interrogator.clip.image_embeddings(pixels), interrogator.table, 3)
    for caption, result, ranked in zip(["a cat", "a cup"], results, expected, strict=True):
        assert result.text == ", ".join([caption, *(t.term for t in ranked)])
        assert result.tags == {
            name: {t.term: round(t.similarity, 4) for t in ranked if t.list == name}
            for name in {t.list for t in ranked}
        }
