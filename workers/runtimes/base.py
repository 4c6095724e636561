"""What every model kind offers the worker: LitServe's shape, load -> pixels -> predict ->
postprocess, behind `annotate` so the pipeline never needs to know which kind it drives."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from captioning.settings import Settings
from workers.pixels import ModelPixels


@dataclass(frozen=True)
class Annotation:
    """One image's result from one model kind: `text` goes in the row's `caption`, the
    other fields in their own columns (None where the kind has none)."""

    text: str
    tags: dict[str, dict[str, float]] | None = None


#: One image's results so far: kind -> its annotation.
Results = Mapping[str, Annotation]


class Runtime(Protocol):
    """A model loaded once per worker process on one device.

    `name` is the annotator's id, stored in each row's `model`; `image_size` the side of
    the square it takes; `decode_size` the side decode may shrink an image to before
    `to_pixels` (JPEG draft mode, box reduce), or None where the kind's preprocessing must
    see the full-resolution image to be exact; `batch_size` may shrink after an
    out-of-memory error, so callers read it per micro-batch.
    """

    name: str
    is_placeholder: bool
    image_size: int
    decode_size: int | None
    batch_size: int

    @classmethod
    def load(cls, settings: Settings) -> Runtime:
        """Load the kind's model named in `settings`; raise ModelLoadError saying what to do."""
        ...

    def to_pixels(self, image: Image.Image) -> ModelPixels:
        """One decoded RGB image -> this kind's uint8 pixels (runs in decode threads)."""
        ...

    def annotate(
        self, pixels: Sequence[ModelPixels], prompt: str, earlier: Sequence[Results]
    ) -> list[Annotation]:
        """Results for one micro-batch, in order (preprocess -> predict -> postprocess).
        `earlier` holds each image's results of the kinds run before this one in the job,
        among them those it builds on (captioning/kinds.py); a kind that builds on none
        may be given an empty sequence."""
        ...


def annotate_in_batches(
    runtime: Runtime,
    pixels: Sequence[ModelPixels],
    prompt: str,
    earlier: Sequence[Results] = (),
) -> list[Annotation]:
    """Results for `pixels`, in order, in the runtime's own micro-batches (read per batch);
    `earlier` as `Runtime.annotate` takes it, for the same images (empty for a kind that
    builds on no other)."""
    results: list[Annotation] = []
    start = 0
    while start < len(pixels):
        stop = start + runtime.batch_size
        results.extend(runtime.annotate(pixels[start:stop], prompt, earlier[start:stop]))
        start = stop
    return results
