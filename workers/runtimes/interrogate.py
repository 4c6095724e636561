"""The `interrogate` kind: CLIP Interrogator prompts in its "fast" mode.

A prompt is the image's caption (the `caption` kind's result, which the worker generates
first for the same micro-batch, once, whether or not the job also asks for caption rows)
followed by the terms of the CLIP Interrogator's lists closest to the image's CLIP
embedding. The term embeddings are read from the on-disk cache (or computed into it) when
the worker starts, never per image. Rows hold the prompt in `caption` and the terms it took
in `tags`, as {list: {term: cosine similarity}}.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from captioning.kinds import CAPTION, INTERROGATE
from captioning.settings import Settings
from workers.interrogate.ranking import Interrogation, TermTable, fast_prompt, rank_terms
from workers.interrogate.term_cache import term_table
from workers.interrogate.terms import DATA_DIR, load_term_lists
from workers.pixels import ModelPixels
from workers.runtimes.base import Annotation, Results
from workers.runtimes.clip import ClipRuntime


class Interrogator:
    """A CLIP runtime, the term embeddings it ranks, and how many terms a prompt gets."""

    def __init__(
        self, *, name: str, clip: ClipRuntime, table: TermTable, count: int, batch_size: int
    ) -> None:
        self.name = name
        self.clip = clip
        # On the CLIP device in its dtype: one matmul per micro-batch against every term.
        self.table = TermTable(table.terms, table.embeddings.to(clip.device, clip.dtype))
        self.count = count
        self.batch_size = batch_size
        self.is_placeholder = clip.is_placeholder
        self.image_size = clip.image_size
        self.decode_size: int | None = clip.image_size

    @classmethod
    def load(cls, settings: Settings) -> Interrogator:
        """The CLIP model of CAPTIONER_CLIP_MODEL and the term table for it (cached)."""
        clip = ClipRuntime.load(settings)
        terms = load_term_lists(settings.term_lists_dir or DATA_DIR)
        return cls(
            name=INTERROGATE.model(settings),
            clip=clip,
            table=term_table(clip, terms, settings.term_cache_dir),
            count=settings.interrogate_terms,
            batch_size=settings.batch_size,
        )

    def to_pixels(self, image: Image.Image) -> ModelPixels:
        return self.clip.to_pixels(image)

    def interrogate(
        self, captions: Sequence[str], pixels: Sequence[ModelPixels]
    ) -> list[Interrogation]:
        """Prompts for `captions` and the CLIP pixels of the same images, in order."""
        ranked = rank_terms(self.clip.image_embeddings(pixels), self.table, self.count)
        return [
            fast_prompt(caption, terms, self.clip.fits)
            for caption, terms in zip(captions, ranked, strict=True)
        ]

    def annotate(
        self, pixels: Sequence[ModelPixels], prompt: str, earlier: Sequence[Results]
    ) -> list[Annotation]:
        """The runtime interface: prompts built on each image's caption in `earlier`."""
        captions = [results[CAPTION.name].text for results in earlier]
        return [
            Annotation(found.prompt, tags=terms_by_list(found))
            for found in self.interrogate(captions, pixels)
        ]


def terms_by_list(found: Interrogation) -> dict[str, dict[str, float]]:
    """The prompt's terms as {list: {term: similarity}}, the shape of the tags column."""
    grouped: dict[str, dict[str, float]] = {}
    for term in found.terms:
        grouped.setdefault(term.list, {})[term.term] = round(term.similarity, 4)
    return grouped
