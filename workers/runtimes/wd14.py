"""WD14 tags: SmilingWolf's wd-*-tagger-v3 (`model.onnx` + `selected_tags.csv`) on onnxruntime.

The preprocessing is the taggers' own (their Hugging Face space and the training scripts):
composite on white, pad to a square on white (centred), bicubic resize to the model's input
size, BGR, float32 0-255, NHWC. Here the pad and resize run per image in the decode threads
and stay uint8 (the float conversion is exact, so it waits for the batch); the channel flip
and float conversion are one NumPy operation per micro-batch.

A row's `caption` is the selected tags as training tools read them (character tags, then
general ones, each by falling probability, comma-separated; underscores become spaces
except in kaomoji); its `tags` column holds {"rating", "character", "general"}: tag ->
probability (every rating, the other two above their thresholds).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from captioning.errors import ModelLoadError
from captioning.settings import Settings
from workers.pixels import ModelPixels
from workers.runtimes import loading, tiny
from workers.runtimes.base import Annotation, Results

log = logging.getLogger(__name__)

MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
TAGGER_FILES = (MODEL_FILE, TAGS_FILE)
#: `category` values of selected_tags.csv.
RATING, GENERAL, CHARACTER = 9, 0, 4
#: Tags whose underscores are part of the face, kept as they are (the taggers' space keeps
#: the same list).
KAOMOJI = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9",
    ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
})
_WHITE = (255, 255, 255)
_DECIMALS = 4  # stored probabilities: enough to re-threshold, small rows


def display_name(tag: str) -> str:
    return tag if tag in KAOMOJI else tag.replace("_", " ")


@dataclass(frozen=True)
class TagList:
    """selected_tags.csv: the model's output columns, by category."""

    names: tuple[str, ...]
    rating: np.ndarray
    general: np.ndarray
    character: np.ndarray

    @classmethod
    def read(cls, path: Path) -> TagList:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or not {"name", "category"} <= set(rows[0]):
            raise ModelLoadError(f"{path} is not a tagger's selected_tags.csv (name, category)")
        categories = np.array([int(row["category"]) for row in rows])
        return cls(
            names=tuple(display_name(row["name"]) for row in rows),
            rating=np.flatnonzero(categories == RATING),
            general=np.flatnonzero(categories == GENERAL),
            character=np.flatnonzero(categories == CHARACTER),
        )


@dataclass(frozen=True)
class Thresholds:
    general: float
    character: float


def select_tags(
    probs: np.ndarray, tags: TagList, thresholds: Thresholds
) -> dict[str, dict[str, float]]:
    """One image's probabilities -> {"rating": all, "character"/"general": above threshold},
    each by falling probability (a tag exactly at the threshold is left out, as in the
    taggers' own scripts)."""

    def pick(indices: np.ndarray, threshold: float) -> dict[str, float]:
        chosen = indices[probs[indices] > threshold]
        ordered = chosen[np.argsort(-probs[chosen], kind="stable")]
        return {tags.names[i]: round(float(probs[i]), _DECIMALS) for i in ordered}

    return {
        "rating": pick(tags.rating, -1.0),
        "character": pick(tags.character, thresholds.character),
        "general": pick(tags.general, thresholds.general),
    }


def tags_caption(selected: dict[str, dict[str, float]]) -> str:
    return ", ".join([*selected["character"], *selected["general"]])


def square_pixels(image: Image.Image, size: int) -> ModelPixels:
    """RGB image -> (size, size, 3) uint8: padded to a centred square on white, then
    resized bicubic (skipped when the square already has the model's size)."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), _WHITE)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.uint8)


def model_input(pixels: Sequence[ModelPixels]) -> np.ndarray:
    """uint8 RGB squares -> the batch the taggers take: float32 0-255, BGR, NHWC."""
    return np.ascontiguousarray(np.stack(pixels)[..., ::-1], dtype=np.float32)


class Tagger:
    """One WD14 tagger session and its tag list."""

    def __init__(
        self, *, name: str, session: ort.InferenceSession, tags: TagList, settings: Settings
    ) -> None:
        self.name = name
        self.session = session
        self.tags = tags
        self.is_placeholder = name in tiny.TWINS
        model_input_ = session.get_inputs()[0]
        self._input_name = model_input_.name
        batch, height, width, channels = model_input_.shape
        if height != width or not isinstance(height, int) or channels != 3:
            raise ModelLoadError(
                f"CAPTIONER_TAGGER_MODEL={name!r} takes {model_input_.shape}; a WD14 tagger "
                "takes (batch, size, size, 3) BGR images"
            )
        outputs = session.get_outputs()[0].shape[-1]
        if outputs != len(tags.names):
            raise ModelLoadError(
                f"CAPTIONER_TAGGER_MODEL={name!r} scores {outputs} tags but its "
                f"{TAGS_FILE} lists {len(tags.names)}"
            )
        self.image_size: int = height
        # Pixel-exact preprocessing needs the full image: no draft decode, no box reduce.
        self.decode_size: int | None = None
        # An export with a fixed batch dimension takes exactly that many images per run.
        self.batch_size = batch if isinstance(batch, int) else settings.tagger_batch_size
        self.thresholds = Thresholds(
            general=settings.tags_general_threshold,
            character=settings.tags_character_threshold,
        )

    @classmethod
    def load(cls, settings: Settings) -> Tagger:
        """Load `settings.tagger_model`: a Hub id or a directory holding model.onnx and
        selected_tags.csv, or the tiny twin."""
        setting = "CAPTIONER_TAGGER_MODEL"
        providers = _providers(settings.device)
        with loading.checkpoint(settings.tagger_model, setting=setting, files=TAGGER_FILES) as src:
            paths = loading.fetch_files(src, TAGGER_FILES, setting=setting)
            try:
                session = ort.InferenceSession(str(paths[MODEL_FILE]), providers=providers)
            except Exception as exc:
                raise ModelLoadError(
                    f"{setting}={settings.tagger_model!r}: cannot open {MODEL_FILE}: {exc}"
                ) from exc
            tags = TagList.read(paths[TAGS_FILE])
        return cls(name=settings.tagger_model, session=session, tags=tags, settings=settings)

    def to_pixels(self, image: Image.Image) -> ModelPixels:
        return square_pixels(image, self.image_size)

    def preprocess(self, pixels: Sequence[ModelPixels]) -> np.ndarray:
        return model_input(pixels)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, tags) probabilities: the v3 graphs end in a sigmoid."""
        return self.session.run(None, {self._input_name: batch})[0]

    def postprocess(self, probs: np.ndarray) -> list[dict[str, dict[str, float]]]:
        return [select_tags(row, self.tags, self.thresholds) for row in probs]

    def annotate(
        self, pixels: Sequence[ModelPixels], prompt: str, earlier: Sequence[Results] = ()
    ) -> list[Annotation]:
        """Tags for one micro-batch; the prompt and other kinds' results mean nothing to a
        tagger."""
        selected = self.postprocess(self.predict(self.preprocess(pixels)))
        return [Annotation(tags_caption(tags), tags=tags) for tags in selected]


def _providers(requested: str | None) -> list[str | tuple[str, dict[str, int]]]:
    """CUDA when the device is (or defaults to) a GPU and onnxruntime has the CUDA provider
    (the onnxruntime-gpu wheel); else the CPU, with a warning when a GPU was there."""
    device = loading.device(requested)
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    if requested is not None:
        raise ModelLoadError(
            f"CAPTIONER_DEVICE={requested!r} but this onnxruntime has no CUDA provider: "
            "pip install onnxruntime-gpu, or use cpu"
        )
    log.warning("the tagger runs on the CPU: this onnxruntime has no CUDA provider "
                "(pip install onnxruntime-gpu)")
    return ["CPUExecutionProvider"]
