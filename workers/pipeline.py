"""A job's images as a stream: fetched and decoded ahead of the model, generated in order.

Each image is fetched by an I/O thread, which hands the bytes to a decode thread (sized to the
CPU: Pillow releases the GIL) for decode + resize to model pixels; a window of `ahead` images
is kept in flight, so while the model generates micro-batch k, batches k+1.. are being fetched
and decoded, and memory stays bounded however many images a job holds. Results come back in
job order; an image's own failure is recorded on its state and never stops the stream, while
a transient store failure propagates (the job is retried).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from itertools import chain

from PIL import Image

from captioning import metrics
from captioning.errors import ImageError
from captioning.messages import JobItem
from captioning.storage import Stores
from captioning.uris import ImageLocation
from workers.fetch import fetch_one
from workers.images import decode_image
from workers.pixels import ModelPixels
from workers.runtimes.blip2 import CaptionModel


@dataclass
class ItemState:
    """What we know about one item as it moves through the stages. The bytes are dropped
    once decoded and the pixels once captioned, so a long job does not pile them up."""

    item: JobItem
    location: ImageLocation | None = None
    etag: str | None = None
    version_id: str | None = None
    nbytes: int | None = None
    width: int | None = None
    height: int | None = None
    pixels: ModelPixels | None = None
    caption: str | None = None
    error: ImageError | None = None
    digest: str | None = None

    @property
    def alive(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Stages:
    """What preparing an image needs: where to fetch, how to decode, which threads run it."""

    stores: Stores
    max_bytes: int
    max_pixels: int
    to_pixels: Callable[[Image.Image], ModelPixels]
    target_size: int
    io_pool: Executor
    decode_pool: Executor

    def prepare(self, state: ItemState) -> None:
        """Fetch then decode one item (in an I/O thread), recording an image error on it."""
        assert state.location is not None
        with metrics.STAGE_SECONDS.labels("fetch").time():
            fetched = fetch_one(
                self.stores, state.location, max_bytes=self.max_bytes,
                version_id=state.item.version_id,
            )
        if isinstance(fetched, ImageError):
            state.error = fetched
            state.etag = fetched.etag
            return
        state.etag, state.version_id = fetched.etag, fetched.version_id
        state.nbytes = len(fetched.data)
        state.digest = hashlib.sha256(fetched.data).hexdigest()
        try:
            self.decode_pool.submit(self._decode, state, fetched.data).result()
        except ImageError as exc:
            state.error = exc

    def _decode(self, state: ItemState, data: bytes) -> None:
        with metrics.STAGE_SECONDS.labels("decode").time():
            decoded = decode_image(data, max_pixels=self.max_pixels, target_size=self.target_size)
            state.width, state.height = decoded.width, decoded.height
            state.pixels = self.to_pixels(decoded.image)

    def stream(self, states: Iterable[ItemState], ahead: int) -> Iterator[ItemState]:
        """Yield `states` in order, each prepared, with up to `ahead` in flight."""
        todo = iter(states)
        pending: deque[tuple[ItemState, Future[None]]] = deque()

        def top_up() -> None:
            while len(pending) < ahead and (state := next(todo, None)) is not None:
                pending.append((state, self.io_pool.submit(self.prepare, state)))

        top_up()
        try:
            while pending:
                state, future = pending.popleft()
                future.result()  # StoreUnavailable (transient) ends the stream and the job
                top_up()
                yield state
        finally:  # the job failed or was abandoned: do not fetch what nobody will read
            for _, future in pending:
                future.cancel()


def micro_batches(
    states: Iterable[ItemState], size: Callable[[], int]
) -> Iterator[list[ItemState]]:
    """Group the images that decoded into batches of `size()` (read per batch: the model may
    lower it after running out of memory); failed ones are skipped, they need no model."""
    batch: list[ItemState] = []
    for state in states:
        if state.alive:
            batch.append(state)
        if len(batch) >= size():
            yield batch
            batch = []
    if batch:
        yield batch


def caption_stream(
    states: Sequence[ItemState],
    prompt: str,
    model: CaptionModel,
    stages: Stages,
    turn: AbstractContextManager[object],
    *,
    lookahead: int,
    earlier: EarlierCaptions | None = None,
) -> None:
    """Caption `states` as their pixels arrive, `lookahead` images prepared ahead. The model
    (`turn`) is taken once the first batch is ready and held to the last, so the jobs in
    flight finish in the order they got it. With `earlier` (content dedupe), images whose
    bytes already have a caption get it copied and skip the model."""
    batches = micro_batches(stages.stream(states, lookahead), lambda: model.batch_size)
    first = next(batches, None)
    if first is None:
        return
    with turn:
        for prepared in chain([first], batches):
            batch = prepared if earlier is None else copy_earlier(prepared, earlier)
            if not batch:
                continue
            with metrics.STAGE_SECONDS.labels("generate").time():
                captions = model.generate([s.pixels for s in batch if s.pixels is not None], prompt)
            metrics.BATCH_SIZE.observe(len(batch))
            for state, caption in zip(batch, captions, strict=True):
                state.caption, state.pixels = caption, None


EarlierCaptions = Callable[[list[str]], dict[str, str]]
"""content digests -> {digest: caption} of earlier `ok` rows for this job's model and prompt."""


def copy_earlier(batch: list[ItemState], earlier: EarlierCaptions) -> list[ItemState]:
    """Give each image whose bytes were captioned before that caption; return the rest."""
    found = earlier([state.digest for state in batch if state.digest])
    rest = []
    for state in batch:
        caption = found.get(state.digest or "")
        if caption is None:
            rest.append(state)
        else:
            state.caption, state.pixels = caption, None
    metrics.DEDUPED.inc(len(batch) - len(rest))
    return rest
