"""What every model kind offers the worker: LitServe's shape, load -> pixels -> predict ->
postprocess, behind `annotate` so the pipeline never needs to know which kind it drives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from captioning.settings import Settings
from workers.pixels import ModelPixels


@dataclass(frozen=True)
class Annotation:
    """One image's result from one model kind: `text` goes in the row's `caption`."""

    text: str


class Runtime(Protocol):
    """A model loaded once per worker process on one device.

    `name` is the annotator's id, stored in each row's `model`; `image_size` is the
    resolution decode must keep at least (JPEG draft mode); `batch_size` may shrink after
    an out-of-memory error, so callers read it per micro-batch.
    """

    name: str
    is_placeholder: bool
    image_size: int
    batch_size: int

    @classmethod
    def load(cls, settings: Settings) -> Runtime:
        """Load the kind's model named in `settings`; raise ModelLoadError saying what to do."""
        ...

    def to_pixels(self, image: Image.Image) -> ModelPixels:
        """One decoded RGB image -> this kind's uint8 pixels (runs in decode threads)."""
        ...

    def annotate(self, pixels: Sequence[ModelPixels], prompt: str) -> list[Annotation]:
        """Results for one micro-batch, in order (preprocess -> predict -> postprocess)."""
        ...
