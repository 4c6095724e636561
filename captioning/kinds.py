"""Job kinds: what a job can ask of an image, and which setting names each kind's model.

A kind's rows carry its annotator's model id in `model`, so one (uri, etag, model, prompt)
key per kind keeps skip-existing, dedupe and `attempts` working unchanged. A kind that reads
no prompt (a tagger) keys its rows with prompt `''`, whatever the job's prompt.

A kind may build on the results of others for the same image (interrogate's prompt starts
with the caption): a worker serving it loads and runs those first, once per image, and
writes their rows only when the job asks for them; its annotator id joins their models and
its own with "+", so a row says every model that made it.

To add a kind: a `Kind` here (and its model setting in settings.py), a runtime module in
workers/runtimes/ registered in workers/runtimes/registry.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from captioning.errors import ConfigError

if TYPE_CHECKING:
    from captioning.settings import Settings


@dataclass(frozen=True)
class Kind:
    name: str
    #: The Settings field holding this kind's model (a Hugging Face id, a directory, a twin).
    model_setting: str
    uses_prompt: bool
    #: Kinds whose results for the same image this one builds on: a worker serving it serves
    #: them too and runs them first; its annotator id names their models before its own.
    builds_on: tuple[str, ...] = ()

    def model(self, settings: Settings) -> str:
        own = str(getattr(settings, self.model_setting))
        return "+".join([*(KINDS[name].model(settings) for name in self.builds_on), own])

    @property
    def model_env(self) -> tuple[str, ...]:
        """The CAPTIONER_* variables that name this kind's annotator."""
        bases = (env for name in self.builds_on for env in KINDS[name].model_env)
        return (*bases, f"CAPTIONER_{self.model_setting.upper()}")

    def row_prompt(self, prompt: str) -> str:
        return prompt if self.uses_prompt else ""


CAPTION = Kind("caption", model_setting="model", uses_prompt=True)
TAGS = Kind("tags", model_setting="tagger_model", uses_prompt=False)
#: A CLIP Interrogator prompt: the caption (so the caption's prompt) and the closest terms.
INTERROGATE = Kind(
    "interrogate", model_setting="clip_model", uses_prompt=True, builds_on=(CAPTION.name,)
)

KINDS: dict[str, Kind] = {kind.name: kind for kind in (CAPTION, TAGS, INTERROGATE)}


def parse_kinds(names: Iterable[str]) -> tuple[str, ...]:
    """Known kind names, deduplicated in order; ConfigError naming the unknown ones."""
    chosen = tuple(dict.fromkeys(name.strip() for name in names if name.strip()))
    unknown = [name for name in chosen if name not in KINDS]
    if unknown:
        raise ConfigError(
            f"unknown kind {', '.join(map(repr, unknown))}: choose from {', '.join(KINDS)}"
        )
    if not chosen:
        raise ConfigError(f"no kind given: choose from {', '.join(KINDS)}")
    return chosen


def with_foundations(kinds: Iterable[str]) -> tuple[str, ...]:
    """`kinds` and every kind they build on, each after what it builds on."""
    ordered: dict[str, None] = {}

    def add(name: str) -> None:
        for base in KINDS[name].builds_on:
            add(base)
        ordered.setdefault(name)

    for name in kinds:
        add(name)
    return tuple(ordered)


def row_prompt(kind: str, prompt: str) -> str:
    """The prompt a row of `kind` is keyed with (a kind this release does not know keeps it)."""
    return KINDS[kind].row_prompt(prompt) if kind in KINDS else prompt


def annotators(settings: Settings, kinds: Iterable[str]) -> dict[str, str]:
    """kind -> the model id the settings name for it: what a job asks for, and a row's key."""
    return {name: KINDS[name].model(settings) for name in kinds}
