"""The job message: the one contract between producers and workers.

A CaptionJob carries many images so Redis holds ~100 bytes per image instead of ~1,000 for a
one-image Celery message. It is plain JSON; the worker validates it strictly, because anyone
who can write to Redis can write a message.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from captioning.errors import InvalidJob
from captioning.kinds import KINDS
from captioning.wire import compact, expand

TASK_NAME = "captioning.caption_batch"
REALTIME_QUEUE = "captions.realtime"
BULK_QUEUE = "captions.bulk"
WORK_QUEUES = (REALTIME_QUEUE, BULK_QUEUE)
#: Where a worker forwards the kinds of a job it does not serve; only workers serving the
#: kind consume it (workers/routing.py).
KIND_QUEUE = "captions.kind.{}"

Source = Literal["backfill", "event", "cli"]

MAX_ITEMS_PER_JOB = 1024
MAX_PROMPT_CHARS = 1000
MAX_KINDS = 8
MAX_PROMPTS_PER_JOB = 8

Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]

KindName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
ModelId = Annotated[str, StringConstraints(min_length=1, max_length=512)]


def kind_queue(kind: str) -> str:
    return KIND_QUEUE.format(kind)


def is_kind_queue(queue: str) -> bool:
    return queue.startswith(kind_queue(""))


#: Every queue workers drain: what the exporter and `captioner status` report.
WAITING_QUEUES = (*WORK_QUEUES, *(kind_queue(kind) for kind in KINDS))


class JobItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(min_length=1, max_length=2048)
    etag: str | None = Field(default=None, max_length=256)
    version_id: str | None = Field(default=None, max_length=1024)


class CaptionJob(BaseModel):
    """Either `model` (a caption job, the original form) or `kinds` (kind -> model id).

    Producers write the original form for caption-only jobs, so workers of the previous
    release keep taking them during a rolling upgrade.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    items: tuple[JobItem, ...] = Field(min_length=1, max_length=MAX_ITEMS_PER_JOB)
    model: ModelId | None = None
    kinds: dict[KindName, ModelId] | None = Field(default=None, min_length=1, max_length=MAX_KINDS)
    prompt: Prompt = ""
    # Several prompts for every image (one caption row each, one fetch and vision pass per
    # image); the caption kind reads them all, other kinds the first. Absent in older
    # messages: then `prompt` is the only one. Sent only when there are two or more, so a
    # worker of the previous release still reads every one-prompt job.
    prompts: tuple[Prompt, ...] | None = Field(
        default=None, min_length=1, max_length=MAX_PROMPTS_PER_JOB
    )
    source: Source
    enqueued_at: float = Field(default_factory=time.time, ge=0)

    @model_validator(mode="after")
    def _one_form(self) -> CaptionJob:
        if (self.model is None) == (self.kinds is None):
            raise ValueError("give either model (a caption job) or kinds, not both or neither")
        if self.prompts is not None:
            if len(set(self.prompts)) != len(self.prompts):
                raise ValueError("prompts must not repeat (one row per image and prompt)")
            if self.prompt and self.prompt not in self.prompts:
                raise ValueError("give either prompt or prompts, not a prompt outside prompts")
        return self

    @classmethod
    def create(
        cls,
        *,
        items: tuple[JobItem, ...],
        annotators: Mapping[str, str],
        prompts: Sequence[str],
        source: Source,
        enqueued_at: float | None = None,
    ) -> CaptionJob:
        """A job asking each kind of `annotators` of its model, with `prompts`, in the oldest
        form that says it (`enqueued_at` kept when a worker hands a job on)."""
        when = {} if enqueued_at is None else {"enqueued_at": enqueued_at}
        prompt, several = (prompts[0], None) if len(prompts) == 1 else ("", tuple(prompts))
        form = (
            {"model": annotators["caption"]}
            if set(annotators) == {"caption"}
            else {"kinds": dict(annotators)}
        )
        return cls(
            items=items, prompt=prompt, prompts=several, source=source, **form, **when
        )

    @property
    def annotators(self) -> dict[str, str]:
        """kind -> model id; a job in the original form is a caption job."""
        if self.kinds is not None:
            return dict(self.kinds)
        assert self.model is not None
        return {"caption": self.model}

    @property
    def all_prompts(self) -> tuple[str, ...]:
        """The prompts every image is captioned with, in order (the first is the main one)."""
        return self.prompts if self.prompts is not None else (self.prompt,)

    def to_message(self) -> dict[str, object]:
        """The compact wire form (captioning/wire.py); `from_message` reads both forms."""
        unused = {"kinds"} if self.kinds is None else {"model"}
        if self.prompts is None:
            unused.add("prompts")
        fields = self.model_dump(mode="json", exclude={"items", *unused})
        items = [
            {"uri": item.uri, "etag": item.etag, "version_id": item.version_id}
            for item in self.items
        ]  # attribute reads: a model_dump per item would be a fifth of a 32-image send
        return compact(fields, items)

    @classmethod
    def from_message(cls, payload: object) -> CaptionJob:
        if not isinstance(payload, dict):
            raise InvalidJob(f"job must be a JSON object, got {type(payload).__name__}")
        payload = expand(payload)
        if isinstance(payload, str):
            raise InvalidJob(f"invalid CaptionJob: {payload}")
        try:
            return cls.model_validate(payload, strict=False)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'job'}: {err['msg']}"
                for err in exc.errors()[:5]
            )
            raise InvalidJob(f"invalid CaptionJob: {problems}") from exc
