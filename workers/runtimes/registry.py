"""Kind name -> its runtime class: the one place a worker learns which module serves a kind.

A new kind registers here (and in captioning/kinds.py, which producers read).
"""

from __future__ import annotations

from captioning.kinds import with_foundations
from captioning.settings import Settings
from workers.runtimes.base import Runtime
from workers.runtimes.blip2 import CaptionModel
from workers.runtimes.interrogate import Interrogator
from workers.runtimes.wd14 import Tagger

RUNTIMES: dict[str, type[Runtime]] = {
    "caption": CaptionModel,
    "tags": Tagger,
    "interrogate": Interrogator,
}


def load_runtimes(settings: Settings) -> dict[str, Runtime]:
    """One loaded runtime per kind in CAPTIONER_KINDS and per kind those build on (loaded
    once, served too), each after what it builds on."""
    return {kind: RUNTIMES[kind].load(settings) for kind in with_foundations(settings.kinds)}
