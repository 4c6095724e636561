"""Where a model's files come from and where it runs: the rules every kind shares.

A model setting is a Hugging Face id, a local directory, or the name of a tiny random twin
(tiny.py). A cached id loads without touching the network, so a worker restarts during a
Hub outage; an uncached one downloads unless offline mode is on. A tiny twin is built into a
temporary directory and then loaded from there like any local checkpoint, so tests run the
production loading code.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.constants import is_offline_mode
from transformers import BitsAndBytesConfig
from transformers.utils import logging as hf_logging

from captioning.errors import ModelLoadError
from captioning.settings import Quantization
from workers.runtimes import tiny

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Source:
    """What to load from: a local directory or a Hub id, and whether to stay off the network."""

    location: str
    local_only: bool


@dataclass(frozen=True)
class Loaded:
    """A processor and its model, placed on the worker's device and dtype."""

    processor: Any
    model: Any
    device: torch.device
    dtype: torch.dtype


def load_pretrained(
    model: str, *, setting: str, what: str, processor_class: Any, model_class: Any,
    device_name: str | None, dtype_name: str | None,
) -> Loaded:
    """Load a transformers processor and model by the shared rules (twin, directory, cached
    or downloaded id), in eval mode; ModelLoadError names the setting to fix."""
    hf_logging.disable_progress_bar()
    on = device(device_name)
    precision = dtype(dtype_name, on)
    with checkpoint(model, setting=setting) as source:
        try:
            processor = processor_class.from_pretrained(
                source.location, local_files_only=source.local_only
            )
            loaded = model_class.from_pretrained(
                source.location, dtype=precision, local_files_only=source.local_only
            ).to(on)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load {what} {model!r} on {on} (set {setting}): {exc}"
            ) from exc
    loaded.eval()
    return Loaded(processor=processor, model=loaded, device=on, dtype=precision)


@contextmanager
def checkpoint(
    model: str, *, setting: str, files: Sequence[str] | None = None
) -> Iterator[Source]:
    """Where to load the model that setting `setting` names, valid inside the `with` block.

    `files` are the files the kind reads (looked for in the cache for an id); None means a
    transformers checkpoint (see `weights_cached`).
    """
    twin = tiny.TWINS.get(model)
    if twin is not None:
        log.warning(twin.notice)
        with tempfile.TemporaryDirectory(prefix=f"{model}-") as tmp:
            yield Source(str(twin.build(Path(tmp))), local_only=True)
        return
    yield resolve_source(model, setting=setting, files=files)


def resolve_source(model: str, *, setting: str, files: Sequence[str] | None = None) -> Source:
    path = Path(model).expanduser()
    if path.is_dir():
        return Source(str(path), local_only=True)
    if model.startswith(("/", ".", "~")):
        raise ModelLoadError(
            f"{setting}={model!r} looks like a path but is not a directory; point it at a "
            "directory holding the model's files, or use a Hugging Face id"
        )
    if weights_cached(model, files=files):
        return Source(model, local_only=True)
    if offline():
        raise ModelLoadError(
            f"{setting}={model!r} is not in the local Hugging Face cache and offline mode is "
            f"on (HF_HUB_OFFLINE); download it first (`hf download {model}`), or point "
            f"{setting} at a local directory"
        )
    return Source(model, local_only=False)


def fetch_files(source: Source, names: Sequence[str], *, setting: str) -> dict[str, Path]:
    """Local paths of `names` from a directory or a Hub repo (downloaded unless local only)."""
    paths: dict[str, Path] = {}
    for name in names:
        try:
            if Path(source.location).is_dir():
                path = Path(source.location) / name
                if not path.is_file():
                    raise FileNotFoundError(f"no {name} in {source.location}")
            else:
                path = Path(hf_hub_download(
                    source.location, name, local_files_only=source.local_only
                ))
        except Exception as exc:
            raise ModelLoadError(
                f"{setting}={source.location!r}: cannot get {name} ({exc}); it needs "
                f"{', '.join(names)}"
            ) from exc
        paths[name] = path
    return paths


def weights_cached(
    model_id: str, *, cache_dir: Path | None = None, files: Sequence[str] | None = None
) -> bool:
    """True when all of `model_id`'s `files` are in the local HF cache; with no `files`, a
    transformers checkpoint's config and weights (one file, or every shard of an index).

    Reads the cache layout only (no network), so it answers the same with HF_HUB_OFFLINE.
    """

    def cached(filename: str) -> str | None:
        path = try_to_load_from_cache(model_id, filename, cache_dir=cache_dir)
        return path if isinstance(path, str) else None

    if files is not None:
        return all(cached(name) for name in files)
    if cached("config.json") is None:
        return False
    if any(cached(name) for name in _WEIGHT_FILES):
        return True
    for index_name in _WEIGHT_INDEXES:
        index = cached(index_name)
        if index is not None:
            shards = set(json.loads(Path(index).read_text())["weight_map"].values())
            return all(cached(shard) for shard in shards)
    return False


def offline() -> bool:
    """huggingface_hub reads HF_HUB_OFFLINE once at import; honour it when set later too."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return is_offline_mode() or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def device(requested: str | None) -> torch.device:
    """CAPTIONER_DEVICE, or CUDA when torch sees one, else the CPU."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(requested)
    except RuntimeError as exc:
        raise ModelLoadError(f"CAPTIONER_DEVICE={requested!r} is not a torch device") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"CAPTIONER_DEVICE={requested!r} but CUDA is not available to torch here; "
            "unset it (auto) or use cpu"
        )
    return chosen


def dtype(requested: str | None, on: torch.device) -> torch.dtype:
    """CAPTIONER_DTYPE, else fp16 on GPU (what BLIP-2 checkpoints are published in) and fp32
    where fp16 is slow."""
    if requested:
        return DTYPES[requested]
    return torch.float16 if on.type == "cuda" else torch.float32


def quantization_config(mode: Quantization, on: torch.device) -> BitsAndBytesConfig | None:
    """bitsandbytes 8/4-bit loading: CUDA only, and only where bitsandbytes is installed."""
    if mode == "none":
        return None
    if on.type != "cuda":
        raise ModelLoadError(
            f"CAPTIONER_QUANTIZATION={mode} needs a CUDA device (bitsandbytes); this worker "
            f"runs on {on}"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"CAPTIONER_QUANTIZATION={mode} needs bitsandbytes: pip install bitsandbytes"
        )
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)
