"""S3 event JSON -> image references. Pure: no I/O, so every envelope is unit-tested.

Accepted envelopes, as delivered to SQS or posted to a webhook:
- S3 notifications, `{"Records": [...]}` (AWS; MinIO and Ceph RGW post the same shape);
- EventBridge, `{"source": "aws.s3", "detail-type": "Object Created", "detail": {...}}`;
- either of those wrapped in an SNS notification (`{"Type": "Notification", "Message": "..."}`),
  the usual S3 -> SNS -> SQS fan-out.

Only object-created events of image keys become references. `s3:TestEvent` (sent when a
notification is configured) and every other event type yield nothing. Keys arrive URL-encoded
(`+` for space, `%xx`), so they are decoded with `unquote_plus`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from captioning.errors import InvalidEvent
from captioning.messages import JobItem
from producer.keys import is_image_key, s3_uri

MAX_SNS_NESTING = 2


@dataclass(frozen=True)
class ObjectRef:
    """One created object: what to caption, and the identity used to drop duplicate events."""

    bucket: str
    key: str
    etag: str | None = None
    version_id: str | None = None

    @property
    def uri(self) -> str:
        return s3_uri(self.bucket, self.key)

    def job_item(self) -> JobItem:
        return JobItem(uri=self.uri, etag=self.etag, version_id=self.version_id)


def refs_from_event(body: str | bytes | Mapping[str, Any]) -> list[ObjectRef]:
    """Image references in one event body; raise InvalidEvent if it is not event JSON."""
    document = _load(body) if isinstance(body, str | bytes) else body
    return _refs(document, depth=0)


def _load(body: str | bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidEvent(f"event body is not JSON: {exc}") from exc


def _refs(document: Any, depth: int) -> list[ObjectRef]:
    if not isinstance(document, Mapping):
        raise InvalidEvent(f"event must be a JSON object, got {type(document).__name__}")
    if document.get("Event") == "s3:TestEvent":
        return []
    if "Records" in document:
        records = document["Records"]
        if not isinstance(records, list):
            raise InvalidEvent("event 'Records' must be a list")
        return [ref for record in records if (ref := _from_record(record)) is not None]
    if document.get("source") == "aws.s3" and "detail" in document:
        ref = _from_eventbridge(document)
        return [ref] if ref is not None else []
    if document.get("Type") == "Notification" and depth < MAX_SNS_NESTING:
        return _refs(_load(str(document.get("Message", ""))), depth + 1)
    raise InvalidEvent(
        "not an S3 event: expected 'Records' (S3 notification), an EventBridge "
        "'detail' from source aws.s3, or an SNS notification wrapping one of them"
    )


def _from_record(record: Any) -> ObjectRef | None:
    """`eventName` is `ObjectCreated:Put` on AWS and `s3:ObjectCreated:Put` on MinIO."""
    try:
        if not str(record.get("eventName", "")).removeprefix("s3:").startswith("ObjectCreated:"):
            return None
        s3 = record["s3"]
        obj = s3["object"]
        return _image_ref(
            s3["bucket"]["name"], obj["key"], obj.get("eTag"), obj.get("versionId")
        )
    except (AttributeError, KeyError, TypeError) as exc:
        raise InvalidEvent(f"S3 event record without s3.bucket.name/s3.object.key: {exc}") from exc


def _from_eventbridge(document: Mapping[str, Any]) -> ObjectRef | None:
    if document.get("detail-type") != "Object Created":
        return None
    try:
        detail = document["detail"]
        obj = detail["object"]
        return _image_ref(
            detail["bucket"]["name"], obj["key"], obj.get("etag"), obj.get("version-id")
        )
    except (AttributeError, KeyError, TypeError) as exc:
        raise InvalidEvent(
            f"EventBridge event without detail.bucket.name/detail.object.key: {exc}"
        ) from exc


def _image_ref(bucket: Any, key: Any, etag: Any, version_id: Any) -> ObjectRef | None:
    if not isinstance(bucket, str) or not bucket or not isinstance(key, str):
        raise InvalidEvent("event bucket name and object key must be non-empty strings")
    decoded = unquote_plus(key)
    if not decoded or decoded.endswith("/") or not is_image_key(decoded):
        return None
    return ObjectRef(
        bucket=bucket,
        key=decoded,
        etag=_optional(etag, strip='"'),
        version_id=_optional(version_id),
    )


def _optional(value: Any, strip: str = "") -> str | None:
    """Stores send '', null or a quoted string for "unknown"; all of them become None."""
    text = str(value).strip(strip) if value is not None else ""
    return text or None
