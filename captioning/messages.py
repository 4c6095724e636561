"""The job message: the one contract between producers and workers.

A CaptionJob carries many images so Redis holds ~100 bytes per image instead of ~1,000 for a
one-image Celery message. It is plain JSON; the worker validates it strictly, because anyone
who can write to Redis can write a message.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from captioning.errors import InvalidJob

TASK_NAME = "captioning.caption_batch"
REALTIME_QUEUE = "captions.realtime"
BULK_QUEUE = "captions.bulk"
WORK_QUEUES = (REALTIME_QUEUE, BULK_QUEUE)

Source = Literal["backfill", "event", "cli"]

MAX_ITEMS_PER_JOB = 1024
MAX_PROMPT_CHARS = 1000
MAX_PROMPTS_PER_JOB = 8

Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class JobItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(min_length=1, max_length=2048)
    etag: str | None = Field(default=None, max_length=256)
    version_id: str | None = Field(default=None, max_length=1024)


class CaptionJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    items: tuple[JobItem, ...] = Field(min_length=1, max_length=MAX_ITEMS_PER_JOB)
    model: str = Field(min_length=1, max_length=512)
    prompt: Prompt = ""
    # Several prompts for every image (one row each, one fetch and vision pass per image).
    # Absent in older messages: then `prompt` is the only one. Sent only when there are two
    # or more, so a worker of the previous release still reads every one-prompt job.
    prompts: tuple[Prompt, ...] | None = Field(
        default=None, min_length=1, max_length=MAX_PROMPTS_PER_JOB
    )
    source: Source
    enqueued_at: float = Field(default_factory=time.time, ge=0)

    @model_validator(mode="after")
    def _one_list_of_prompts(self) -> CaptionJob:
        if self.prompts is not None:
            if len(set(self.prompts)) != len(self.prompts):
                raise ValueError("prompts must not repeat (one row per image and prompt)")
            if self.prompt and self.prompt not in self.prompts:
                raise ValueError("give either prompt or prompts, not a prompt outside prompts")
        return self

    @property
    def all_prompts(self) -> tuple[str, ...]:
        """The prompts every image of the job is captioned with, in order."""
        return self.prompts if self.prompts is not None else (self.prompt,)

    @classmethod
    def for_prompts(cls, prompts: Sequence[str], **fields: Any) -> CaptionJob:
        """A job for `prompts`, in the old one-prompt form when there is only one."""
        if len(prompts) == 1:
            return cls(prompt=prompts[0], **fields)
        return cls(prompts=tuple(prompts), **fields)

    def to_message(self) -> dict[str, object]:
        return self.model_dump(mode="json", exclude={"prompts"} if self.prompts is None else None)

    @classmethod
    def from_message(cls, payload: object) -> CaptionJob:
        if not isinstance(payload, dict):
            raise InvalidJob(f"job must be a JSON object, got {type(payload).__name__}")
        try:
            return cls.model_validate(payload, strict=False)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'job'}: {err['msg']}"
                for err in exc.errors()[:5]
            )
            raise InvalidJob(f"invalid CaptionJob: {problems}") from exc
