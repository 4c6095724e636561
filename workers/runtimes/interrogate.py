"""The `interrogate` kind: CLIP Interrogator prompts in its "fast" mode.

A prompt is the image's BLIP-2 caption (from the worker's caption runtime, generated once
per image whichever kinds ask for it) followed by the terms of the CLIP Interrogator's lists
closest to the image's CLIP embedding. The term embeddings are read from the on-disk cache
(or computed into it) when the worker starts, never per image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from captioning.settings import Settings
from workers.interrogate.ranking import Interrogation, TermTable, fast_prompt, rank_terms
from workers.interrogate.term_cache import term_table
from workers.interrogate.terms import DATA_DIR, load_term_lists
from workers.pixels import ModelPixels
from workers.runtimes.clip import ClipRuntime

log = logging.getLogger(__name__)


class Interrogator:
    """A CLIP runtime, the term embeddings it ranks, and how many terms a prompt gets."""

    def __init__(self, clip: ClipRuntime, table: TermTable, count: int) -> None:
        self.clip = clip
        # On the CLIP device in its dtype: one matmul per micro-batch against every term.
        self.table = TermTable(table.terms, table.embeddings.to(clip.device, clip.dtype))
        self.count = count

    @classmethod
    def load(cls, settings: Settings) -> Interrogator:
        clip = ClipRuntime.load(settings)
        terms = load_term_lists(settings.term_lists_dir or DATA_DIR)
        table = term_table(clip, terms, settings.term_cache_dir)
        return cls(clip, table, settings.interrogate_terms)

    def interrogate(
        self, captions: Sequence[str], pixels: Sequence[ModelPixels]
    ) -> list[Interrogation]:
        """Prompts for one micro-batch: `captions` and CLIP `pixels` (clip.to_pixels) of
        the same images, in order."""
        ranked = rank_terms(self.clip.image_embeddings(pixels), self.table, self.count)
        return [
            fast_prompt(caption, terms, self.clip.fits)
            for caption, terms in zip(captions, ranked, strict=True)
        ]
