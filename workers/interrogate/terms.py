"""The CLIP Interrogator's term lists, read from the shipped data files (see data/SOURCES.md).

The lists are built as the original builds them, so a prompt here uses the same vocabulary:
each artist twice ("by X", "inspired by X") and the "trending" terms from its list of art
sites. `digest()` names the exact lists, so cached term embeddings are tied to them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from captioning.errors import ConfigError

DATA_DIR = Path(__file__).with_name("data")
LIST_FILES = ("artists.txt", "flavors.txt", "mediums.txt", "movements.txt")

#: The original's art sites, from which it builds the "trending" list.
SITES = (
    "Artstation", "behance", "cg society", "cgsociety", "deviantart", "dribble", "flickr",
    "instagram", "pexels", "pinterest", "pixabay", "pixiv", "polycount", "reddit",
    "shutterstock", "tumblr", "unsplash", "zbrush central",
)


@dataclass(frozen=True)
class TermLists:
    """Named lists of terms, in the order the original merges them for its fast mode."""

    lists: Mapping[str, tuple[str, ...]]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.lists)

    def __len__(self) -> int:
        return sum(len(terms) for terms in self.lists.values())

    def __iter__(self) -> Iterator[str]:
        """Every term, list after list (the row order of the term embeddings)."""
        for terms in self.lists.values():
            yield from terms

    def digest(self) -> str:
        """sha256 over the names and terms: any change to a list changes it."""
        canonical = json.dumps([[name, list(terms)] for name, terms in self.lists.items()])
        return hashlib.sha256(canonical.encode()).hexdigest()


def trending_terms() -> tuple[str, ...]:
    return (
        *SITES,
        *(f"trending on {site}" for site in SITES),
        *(f"featured on {site}" for site in SITES),
        *(f"{site} contest winner" for site in SITES),
    )


def load_term_lists(directory: Path = DATA_DIR) -> TermLists:
    """The interrogator's five lists from `directory` (artists, flavors, mediums,
    movements as text files, one term a line; trending built from SITES)."""
    artists = read_terms(directory / "artists.txt")
    return TermLists(
        {
            "artists": (*(f"by {a}" for a in artists), *(f"inspired by {a}" for a in artists)),
            "flavors": read_terms(directory / "flavors.txt"),
            "mediums": read_terms(directory / "mediums.txt"),
            "movements": read_terms(directory / "movements.txt"),
            "trendings": trending_terms(),
        }
    )


def read_terms(path: Path) -> tuple[str, ...]:
    """One term per line, stripped, blank lines skipped (the original keeps one blank
    'term' from flavors.txt)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the term list {path} ({exc}); CAPTIONER_TERM_LISTS_DIR must hold "
            f"UTF-8 {', '.join(LIST_FILES)}, one term a line (unset it for the shipped lists)"
        ) from exc
    return tuple(stripped for line in lines if (stripped := line.strip()))
