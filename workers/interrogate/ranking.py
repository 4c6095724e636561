"""Term ranking and prompt assembly: the CLIP Interrogator's "fast" mode, as pure functions.

An image's prompt is its caption followed by the terms whose text embeddings are closest
(cosine similarity) to its image embedding. The original's fast mode ranks the five lists
merged into one and keeps the best `count`; here each list is ranked alone (top `count` of
each) and the candidates merged, which picks the same terms, best first, and keeps each term's
list and similarity for the results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from workers.interrogate.terms import TermLists


@dataclass(frozen=True)
class TermTable:
    """Unit-length text embeddings, row i for the i-th term of `terms` (list after list)."""

    terms: TermLists
    embeddings: torch.Tensor  # (terms, dim)

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.terms):
            raise ValueError(
                f"{tuple(self.embeddings.shape)} embeddings for {len(self.terms)} terms"
            )


@dataclass(frozen=True)
class RankedTerm:
    term: str
    list: str
    similarity: float


@dataclass(frozen=True)
class Interrogation:
    """One image's prompt and the terms it holds, best first."""

    prompt: str
    terms: tuple[RankedTerm, ...]


def rank_terms(
    image_embeddings: torch.Tensor, table: TermTable, count: int
) -> list[list[RankedTerm]]:
    """Per image (rows of `image_embeddings`, any length), its `count` closest terms over
    all lists, most similar first."""
    images = torch.nn.functional.normalize(image_embeddings.to(table.embeddings), dim=-1)
    similarity = (images @ table.embeddings.T).float()
    candidates: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    start = 0
    for name, terms in table.terms.lists.items():
        stop = start + len(terms)
        if terms:
            top = similarity[:, start:stop].topk(min(count, len(terms)), dim=-1)
            candidates.append((name, top.values.cpu(), top.indices.cpu()))
        start = stop
    ranked: list[list[RankedTerm]] = []
    for row in range(similarity.shape[0]):
        found = [
            RankedTerm(table.terms.lists[name][int(index)], name, float(value))
            for name, values, indices in candidates
            for value, index in zip(values[row], indices[row], strict=True)
        ]
        found.sort(key=lambda ranked_term: ranked_term.similarity, reverse=True)
        ranked.append(found[:count])
    return ranked


def fast_prompt(
    caption: str, ranked: Sequence[RankedTerm], fits: Callable[[str], bool]
) -> Interrogation:
    """caption, term, term, ... best first, as the original joins them, stopping before the
    first term that would take the prompt past the CLIP text context (`fits` is False), as
    the original truncates (a prompt for a text-to-image model is read through that context).
    """
    prompt = caption.strip()
    kept: list[RankedTerm] = []
    for ranked_term in ranked:
        longer = f"{prompt}, {ranked_term.term}" if prompt else ranked_term.term
        if not fits(longer):
            break
        prompt = longer
        kept.append(ranked_term)
    return Interrogation(prompt, tuple(kept))
