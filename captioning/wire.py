"""The compact wire form of a CaptionJob: one shared URI prefix and parallel lists.

A backfill job's URIs share everything up to the last `/` of their common prefix
(`s3://bucket/dir/`), and most have no version id, so the job is sent as
`{"base": "s3://bucket/dir/", "keys": ["a.jpg", ...], "etags": ["...", ...], ...}` instead
of one `{"uri", "etag", "version_id"}` object per image: about half the bytes per image.
`etags` and `versions` are left out when every entry is null. Every other field of the job
(model, prompt, source, enqueued_at and anything added later) travels unchanged.

`expand` turns either form back into the `items` form the CaptionJob model validates, so a
worker reads messages from old and new producers alike. Both functions are pure dict
transforms; a malformed compact message is reported as a plain string for InvalidJob.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

COMPACT_FIELDS = ("base", "keys", "etags", "versions")


def compact(fields: dict[str, Any], items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`fields` (the job without its items) plus the items in compact form."""
    uris = [item["uri"] for item in items]
    common = os.path.commonprefix(uris)  # noqa: RUF071 - a string prefix, cut at the last "/"
    base = common[: common.rfind("/") + 1]
    message = {**fields, "base": base, "keys": [uri[len(base) :] for uri in uris]}
    for name, field in (("etags", "etag"), ("versions", "version_id")):
        values = [item.get(field) for item in items]
        if any(value is not None for value in values):
            message[name] = values
    return message


def expand(payload: dict[str, Any]) -> dict[str, Any] | str:
    """The `items` form of `payload`, or a reason why the compact form is malformed.

    A payload without `keys` is returned as it is (the original form)."""
    if "keys" not in payload:
        return payload
    if "items" in payload:
        return "a job has either items or keys, not both"
    base, keys = payload.get("base", ""), payload["keys"]
    if not isinstance(base, str) or not isinstance(keys, list):
        return "base must be a string and keys a list"
    if not all(isinstance(key, str) for key in keys):
        return "keys must be strings"
    columns: dict[str, list[Any]] = {}
    for name, field in (("etags", "etag"), ("versions", "version_id")):
        values = payload.get(name, [None] * len(keys))
        if not isinstance(values, list) or len(values) != len(keys):
            return f"{name} must be a list as long as keys"
        columns[field] = values
    rest = {name: value for name, value in payload.items() if name not in COMPACT_FIELDS}
    rest["items"] = [
        {"uri": base + key, "etag": etag, "version_id": version}
        for key, etag, version in zip(keys, columns["etag"], columns["version_id"], strict=True)
    ]
    return rest
