"""Term embeddings, computed once per CLIP text tower and term lists, then read from disk.

Encoding the ~111,000 terms through CLIP ViT-L/14's text tower takes minutes on a GPU and
far longer on a CPU; the original does it per run (or downloads its own cache). Here the
embeddings are a safetensors file in `CAPTIONER_TERM_CACHE_DIR`, named by what they depend
on: the text tower's identity (a digest of its weights and tokenizer) and the digest of the
term lists. Another model or other lists give another file; a file that does not match what
it claims to hold is recomputed and replaced. Written to a temporary file and renamed, so
workers starting together never read half a file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from workers.interrogate.ranking import TermTable
from workers.interrogate.terms import TermLists

log = logging.getLogger(__name__)

#: Bump when what is stored changes meaning (normalisation, dtype, layout).
CACHE_FORMAT = "1"
ENCODE_CHUNK = 1024


class TextEncoder(Protocol):
    """A CLIP text tower: unit-length embeddings for texts, and a name for what it is."""

    name: str

    @property
    def identity(self) -> str:
        """A digest that changes whenever the embeddings it computes could change."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), dim) unit-length embeddings."""
        ...


def cache_path(cache_dir: Path, encoder: TextEncoder, terms: TermLists) -> Path:
    key = hashlib.sha256(
        f"{CACHE_FORMAT}\n{encoder.identity}\n{terms.digest()}".encode()
    ).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder.name).strip("_")[-60:]
    return cache_dir / f"{slug}-{key[:24]}.safetensors"


def term_table(encoder: TextEncoder, terms: TermLists, cache_dir: Path) -> TermTable:
    """The terms' embeddings (float16, on the CPU), from the cache or encoded and cached."""
    path = cache_path(cache_dir, encoder, terms)
    metadata = {
        "format": CACHE_FORMAT,
        "model": encoder.name,
        "model_identity": encoder.identity,
        "terms_digest": terms.digest(),
        "terms": str(len(terms)),
    }
    cached = _read(path, metadata)
    if cached is not None:
        log.info("term embeddings for %s read from %s", encoder.name, path)
        return TermTable(terms, cached)
    log.info("encoding %d terms with %s (once; cached in %s)", len(terms), encoder.name, path)
    embeddings = encode_terms(encoder, terms)
    _write(path, embeddings, metadata)
    return TermTable(terms, embeddings)


def encode_terms(encoder: TextEncoder, terms: TermLists) -> torch.Tensor:
    """Every term through the text tower in chunks, kept as float16 (as the original)."""
    texts = list(terms)
    chunks = [
        encoder.encode_texts(texts[start : start + ENCODE_CHUNK]).to("cpu", torch.float16)
        for start in range(0, len(texts), ENCODE_CHUNK)
    ]
    return torch.cat(chunks)


def _read(path: Path, metadata: dict[str, str]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = handle.metadata() or {}
            embeddings = handle.get_tensor("embeddings")
    except (SafetensorError, OSError, KeyError) as exc:
        log.warning("term embedding cache %s is unreadable (%s); recomputing", path, exc)
        return None
    if stored != metadata or embeddings.shape[0] != int(metadata["terms"]):
        log.warning("term embedding cache %s holds other embeddings; recomputing", path)
        return None
    return embeddings


def _write(path: Path, embeddings: torch.Tensor, metadata: dict[str, str]) -> None:
    """Atomically; a cache that cannot be written costs the next start, not this one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"embeddings": embeddings.contiguous()}, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        log.warning(
            "cannot write the term embedding cache %s (%s): the next start encodes the "
            "terms again; point CAPTIONER_TERM_CACHE_DIR at a writable directory", path, exc
        )
