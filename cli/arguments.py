"""Argument types shared by the command groups: they turn bad values into usage errors."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from captioning.errors import ConfigError
from captioning.kinds import parse_kinds


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be a probability between 0 and 1")
    return value


def since_date(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an ISO date like 2024-05-31: {exc}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def per_second(text: str) -> float:
    value = float(text.removesuffix("/s"))
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive rate such as 500/s")
    return value


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
def kind_list(text: str) -> tuple[str, ...]:
    """`caption,tags`: known kinds, comma-separated."""
    try:
        return parse_kinds(text.split(","))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
