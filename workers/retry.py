"""Backoff for transient failures, as a pure function so it can be tested and reasoned about."""

from __future__ import annotations

import random


def backoff_seconds(
    attempt: int, *, base: float = 1.0, cap: float = 300.0, rng: random.Random | None = None
) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt)).

    Full jitter spreads retries of many workers hit by the same outage, so they do not all
    come back at once and knock the recovering service over again.
    """
    ceiling = min(cap, base * (2 ** max(attempt, 0)))
    return (rng or random).uniform(0, ceiling)
