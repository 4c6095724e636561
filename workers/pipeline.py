"""A job's images as a stream: fetched and decoded ahead of the models, annotated in order.

Each image is fetched by an I/O thread, which hands the bytes to a decode thread (sized to the
CPU: Pillow releases the GIL) for one decode and then each kind's pixels (the resize each
model wants); a window of `ahead` images
is kept in flight, so while the model generates micro-batch k, batches k+1.. are being fetched
and decoded, and memory stays bounded however many images a job holds. Results come back in
job order; an image's own failure is recorded on its state and never stops the stream, while
a transient store failure propagates (the job is retried).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import TYPE_CHECKING, cast

from PIL import Image

from captioning import metrics
from captioning.errors import ImageError
from captioning.kinds import CAPTION
from captioning.messages import JobItem
from captioning.results import EarlierCaption
from captioning.settings import Settings
from captioning.storage import Stores
from captioning.uris import ImageLocation
from workers.fetch import fetch_one
from workers.images import decode_image
from workers.pixels import ModelPixels
from workers.runtimes.base import (
    Annotation,
    Candidate,
    Runtime,
    annotate_in_batches,
    in_batches,
)

if TYPE_CHECKING:
    from workers.runtimes.blip2 import CaptionModel


@dataclass
class ItemState:
    """What we know about one item as it moves through the stages. The bytes are dropped
    once decoded and the pixels once annotated, so a long job does not pile them up."""

    item: JobItem
    location: ImageLocation | None = None
    etag: str | None = None
    version_id: str | None = None
    nbytes: int | None = None
    width: int | None = None
    height: int | None = None
    #: kind -> the pixels its model takes, from one decode.
    pixels: dict[str, ModelPixels] = field(default_factory=dict)
    #: kind -> its results, one per prompt the kind reads (the caption kind: every prompt of
    #: the job, in order; the others: one).
    results: dict[str, list[Annotation]] = field(default_factory=dict)
    error: ImageError | None = None
    digest: str | None = None

    @property
    def alive(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Stages:
    """What preparing an image needs: where to fetch, how to decode (shrinking to no less
    than `target_size`, None: full resolution) and into which kinds' pixels, which threads
    run it. `decode_sizes`: each kind's own, for `for_kinds`."""

    stores: Stores
    max_bytes: int
    max_pixels: int
    to_pixels: Mapping[str, Callable[[Image.Image], ModelPixels]]
    target_size: int | None
    decode_sizes: Mapping[str, int | None]
    io_pool: Executor
    decode_pool: Executor

    @classmethod
    def for_runtimes(
        cls,
        runtimes: Mapping[str, Runtime],
        *,
        stores: Stores,
        settings: Settings,
        io_pool: Executor,
        decode_pool: Executor,
    ) -> Stages:
        """One decode per image at the resolution every kind accepts, then each kind's pixels."""
        return cls(
            stores=stores,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            to_pixels={kind: runtime.to_pixels for kind, runtime in runtimes.items()},
            target_size=decode_size(runtime.decode_size for runtime in runtimes.values()),
            decode_sizes={kind: runtime.decode_size for kind, runtime in runtimes.items()},
            io_pool=io_pool,
            decode_pool=decode_pool,
        )

    def for_kinds(self, kinds: Iterable[str]) -> Stages:
        """The stages of a job that asks for `kinds` only: on a worker that also tags, a
        caption job decodes at the captioner's size, not the tagger's full resolution, and
        makes no tagger pixels."""
        wanted = set(kinds)
        if wanted >= set(self.to_pixels):
            return self
        return replace(
            self,
            to_pixels={kind: fn for kind, fn in self.to_pixels.items() if kind in wanted},
            target_size=decode_size(
                size for kind, size in self.decode_sizes.items() if kind in wanted
            ),
        )

    def prepare(self, state: ItemState) -> None:
        """Fetch then decode one item (in an I/O thread), recording an image error on it."""
        assert state.location is not None
        with metrics.STAGE_SECONDS.labels("fetch", metrics.SHARED).time():
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
        with metrics.STAGE_SECONDS.labels("decode", metrics.SHARED).time():
            decoded = decode_image(data, max_pixels=self.max_pixels, target_size=self.target_size)
            state.width, state.height = decoded.width, decoded.height
            state.pixels = {kind: pixels(decoded.image) for kind, pixels in self.to_pixels.items()}

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


def decode_size(sizes: Iterable[int | None]) -> int | None:
    """The side decode may shrink images to: the largest any kind allows, or full resolution
    (None) where one kind needs it."""
    sizes = list(sizes)
    return None if None in sizes else max((s for s in sizes if s is not None), default=None)


def micro_batches(
    states: Iterable[ItemState], size: Callable[[], int]
) -> Iterator[list[ItemState]]:
    """Group the images that decoded into batches of `size()` (read per batch: a model may
    lower its own after running out of memory); failed ones are skipped, they need no model."""
    batch: list[ItemState] = []
    for state in states:
        if state.alive:
            batch.append(state)
        if len(batch) >= size():
            yield batch
            batch = []
    if batch:
        yield batch


def annotate_stream(
    states: Sequence[ItemState],
    prompts: Sequence[str],
    runtimes: Mapping[str, Runtime],
    stages: Stages,
    turn: AbstractContextManager[object],
    *,
    lookahead: int,
    earlier: Mapping[str, EarlierResults] | None = None,
) -> None:
    """Annotate `states` with every kind of `runtimes`, in that order (a kind after those it
    builds on), as their pixels arrive, `lookahead` images prepared ahead; the caption kind
    with every one of `prompts` (one vision pass per micro-batch), the other kinds with the
    first. The models (`turn`) are taken once the first batch is ready and held to the
    last, so the jobs in flight finish in the order they got them. With `earlier` (content
    dedupe), a kind's images whose bytes already have a result get it copied and skip that
    model."""
    if not runtimes:
        return
    earlier = earlier or {}
    batches = micro_batches(
        stages.for_kinds(runtimes).stream(states, lookahead),
        lambda: max(runtime.batch_size for runtime in runtimes.values()),
    )
    first = next(batches, None)
    if first is None:
        return
    with turn:
        for batch in chain([first], batches):
            for kind, runtime in runtimes.items():
                todo = batch if kind not in earlier else copy_earlier(batch, kind, earlier[kind])
                if not todo:
                    continue
                with metrics.STAGE_SECONDS.labels("generate", kind).time():
                    results = annotate_kind(
                        kind, runtime, [s.pixels[kind] for s in todo], prompts,
                        [s.results for s in todo],
                    )
                metrics.BATCH_SIZE.labels(kind).observe(len(todo))
                for state, result in zip(todo, results, strict=True):
                    state.results[kind] = result
            for state in batch:
                state.pixels = {}


def annotate_kind(
    kind: str,
    runtime: Runtime,
    pixels: Sequence[ModelPixels],
    prompts: Sequence[str],
    results: Sequence[Mapping[str, list[Annotation]]],
) -> list[list[Annotation]]:
    """Per image, one result per prompt the kind reads: the caption kind every prompt from
    one vision pass (`annotate_prompts`), any other kind the first prompt, building on the
    earlier kinds' results for it (`results`: per image, kind -> one per prompt)."""
    if kind != CAPTION.name:
        earlier = [{name: found[0] for name, found in image.items()} for image in results]
        return [[one] for one in annotate_in_batches(runtime, pixels, prompts[0], earlier)]
    captioner = cast("CaptionModel", runtime)  # the caption kind's runtime, or a proxy of it
    return in_batches(
        captioner,
        len(pixels),
        lambda start, stop: [
            list(per_image)
            for per_image in zip(
                *captioner.annotate_prompts(pixels[start:stop], prompts), strict=True
            )
        ],
    )


EarlierResults = Callable[[list[str]], dict[str, EarlierCaption]]
"""content digests -> {digest: text} of earlier `ok` rows for this job's model and prompt."""


def annotation_of(earlier: EarlierCaption) -> Annotation:
    return Annotation(
        text=earlier.caption, scorer=earlier.scorer,
        match_probability=earlier.match_probability, itc_cosine=earlier.itc_cosine,
        candidates=tuple(Candidate(**candidate) for candidate in earlier.candidates or ()),
    )


def copy_earlier(
    batch: list[ItemState], kind: str, earlier: EarlierResults
) -> list[ItemState]:
    """Give each image whose bytes were annotated before by this kind's model that result;
    return the rest, which still need the model."""
    found = earlier([state.digest for state in batch if state.digest])
    rest = []
    for state in batch:
        copied = found.get(state.digest or "")
        if copied is None:
            rest.append(state)
        else:
            state.results[kind] = [annotation_of(copied)]
    metrics.DEDUPED.inc(len(batch) - len(rest))
    return rest
