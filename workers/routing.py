"""Which kinds of a job this worker runs, which it hands on, and which it must refuse.

A worker runs the kinds it serves (CAPTIONER_KINDS) with the model the job names. A kind it
does not serve is forwarded as a one-kind job to that kind's queue (`captions.kind.<kind>`),
which only workers serving the kind consume, so it is never lost and never loops. A job is
refused, as `failed` rows that say why, for a kind it asks of another model than this worker
loads, for a kind this release does not know, or for a kind it reached on a kind queue this
worker should not consume (a misconfigured `--queues`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from captioning.errors import ImageError, KindNotServed, ModelMismatch
from captioning.kinds import KINDS
from captioning.messages import REALTIME_QUEUE, is_kind_queue, kind_queue


@dataclass(frozen=True)
class Plan:
    run: dict[str, str] = field(default_factory=dict)
    forward: dict[str, str] = field(default_factory=dict)
    refuse: dict[str, tuple[str, ImageError]] = field(default_factory=dict)


def plan(annotators: Mapping[str, str], served: Mapping[str, str], *, queue: str) -> Plan:
    """Split a job's kind -> model between running here, forwarding and refusing.

    `served` is kind -> the model this worker loaded; `queue` the one the job came from.
    """
    result = Plan()
    serving = ", ".join(served) or "nothing"
    for kind, model in annotators.items():
        if kind in served and served[kind] == model:
            result.run[kind] = model
        elif kind in served:
            result.refuse[kind] = (model, ModelMismatch(
                f"job asks for model {model!r} ({kind}); this worker serves {served[kind]!r}: "
                f"run a worker with that {' and '.join(KINDS[kind].model_env)}, or enqueue with "
                "this one"
            ))
        elif kind not in KINDS:
            result.refuse[kind] = (model, KindNotServed(
                f"unknown kind {kind!r}: this worker knows {', '.join(KINDS)}"
            ))
        elif is_kind_queue(queue):
            result.refuse[kind] = (model, KindNotServed(
                f"job for {kind} reached a worker serving {serving} on {queue}: only workers "
                f"with {kind} in CAPTIONER_KINDS may consume {kind_queue(kind)}"
            ))
        else:
            result.forward[kind] = model
    return result


def consume_order(queues: Iterable[str], kinds: Iterable[str]) -> list[str]:
    """The worker's queues with its kinds' queues added after the realtime queue and before
    the others: forwarded work was started already, but uploads still come first."""
    ordered = list(dict.fromkeys(queues))
    extra = [kind_queue(kind) for kind in kinds if kind_queue(kind) not in ordered]
    at = ordered.index(REALTIME_QUEUE) + 1 if REALTIME_QUEUE in ordered else 0
    return ordered[:at] + extra + ordered[at:]
