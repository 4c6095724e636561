"""The job message: the one contract between producers and workers.

A CaptionJob carries many images so Redis holds ~100 bytes per image instead of ~1,000 for a
one-image Celery message. It is plain JSON; the worker validates it strictly, because anyone
who can write to Redis can write a message.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from captioning.errors import InvalidJob
from captioning.wire import compact, expand

TASK_NAME = "captioning.caption_batch"
REALTIME_QUEUE = "captions.realtime"
BULK_QUEUE = "captions.bulk"
WORK_QUEUES = (REALTIME_QUEUE, BULK_QUEUE)

Source = Literal["backfill", "event", "cli"]

MAX_ITEMS_PER_JOB = 1024
MAX_PROMPT_CHARS = 1000


class JobItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(min_length=1, max_length=2048)
    etag: str | None = Field(default=None, max_length=256)
    version_id: str | None = Field(default=None, max_length=1024)


class CaptionJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    items: tuple[JobItem, ...] = Field(min_length=1, max_length=MAX_ITEMS_PER_JOB)
    model: str = Field(min_length=1, max_length=512)
    prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    source: Source
    enqueued_at: float = Field(default_factory=time.time, ge=0)

    def to_message(self) -> dict[str, object]:
        """The compact wire form (captioning/wire.py); `from_message` reads both forms."""
        fields = self.model_dump(mode="json", exclude={"items"})
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
