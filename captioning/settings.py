"""One typed settings object, read once from `CAPTIONER_*` environment variables.

Every field has a default that works on a laptop; production overrides them through the
environment (Kubernetes ConfigMap/Secret). AWS credentials are deliberately absent: boto3's
own chain (env, profile, IRSA) provides them.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from captioning.errors import ConfigError
from captioning.kinds import parse_kinds

MiB = 1024 * 1024
JOB_FIXED_COST_S = 60

Quantization = Literal["none", "8bit", "4bit"]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAPTIONER_", extra="ignore", frozen=True)

    broker_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "sqlite:///captions.db"
    s3_endpoint_url: str | None = None
    allowed_buckets: Annotated[tuple[str, ...], NoDecode] = ()
    allowed_roots: Annotated[tuple[Path, ...], NoDecode] = ()
    results_uri: str | None = None
    # sidecar: a JSON object per image; parquet: a Parquet object per job (captioning/parquet.py)
    results_format: Literal["sidecar", "parquet"] = "sidecar"
    # Copy the caption of an image whose bytes were already captioned (same model and prompt).
    content_dedupe: bool = False

    # What this deployment produces: workers load a model per kind, producers ask for these
    # unless told otherwise (captioning/kinds.py).
    kinds: Annotated[tuple[str, ...], NoDecode] = ("caption",)
    model: str = "Salesforce/blip2-opt-2.7b"
    tagger_model: str = "SmilingWolf/wd-vit-tagger-v3"
    tagger_batch_size: int = Field(default=32, ge=1, le=1024)
    tags_general_threshold: float = Field(default=0.35, gt=0, le=1)
    tags_character_threshold: float = Field(default=0.85, gt=0, le=1)
    device: str | None = None
    dtype: Literal["float16", "bfloat16", "float32"] | None = None
    batch_size: int = Field(default=16, ge=1, le=1024)
    # On CUDA the worker measures at start-up the largest micro-batch up to this that fits.
    auto_batch_size: bool = True
    max_batch_size: int = Field(default=64, ge=1, le=1024)
    max_new_tokens: int = Field(default=30, ge=1, le=512)
    num_beams: int = Field(default=1, ge=1, le=16)
    prompt: str = Field(default="", max_length=1000)
    # Static KV cache, which transformers compiles (torch.compile) on CUDA. Off: not measured.
    static_cache: bool = False
    quantization: Quantization = "none"
    # An ITM model (Blip2ForImageTextRetrieval) that scores every caption; None: no scores.
    scorer: str | None = None
    # CapFilt: the greedy caption plus `candidates - 1` nucleus samples, all scored, the best
    # kept. Needs a scorer.
    candidates: int = Field(default=1, ge=1, le=16)
    top_p: float = Field(default=0.9, gt=0, le=1)
    temperature: float = Field(default=1.0, gt=0, le=5)

    # The `interrogate` kind: a caption followed by the CLIP Interrogator terms closest to the
    # image in this CLIP model's embedding space.
    clip_model: str = "openai/clip-vit-large-patch14"
    interrogate_terms: int = Field(default=32, ge=1, le=256)
    # Term embeddings, computed once per CLIP model and term lists, are cached here.
    term_cache_dir: Path = Path("~/.cache/captioner/terms")
    # A directory with artists.txt, flavors.txt, mediums.txt, movements.txt; None: the
    # CLIP Interrogator's lists shipped with the captioner.
    term_lists_dir: Path | None = None

    max_image_bytes: int = Field(default=32 * MiB, ge=1)
    max_image_pixels: int = Field(default=64_000_000, ge=1)
    max_job_items: int = Field(default=256, ge=1)
    fetch_concurrency: int = Field(default=16, ge=1, le=256)
    # prefork: the model lives in one child process; a crash or OOM of that child returns
    # its job to the queue at once, and the job time limit is enforced. threads: one process
    # holds `jobs_in_flight` jobs sharing the model, so the next job is fetched and decoded
    # while the current one generates; a crash returns them only after the visibility timeout.
    pool: Literal["prefork", "threads"] = "prefork"
    jobs_in_flight: int = Field(default=2, ge=1, le=8)
    decode_threads: int | None = Field(default=None, ge=1, le=64)  # None: one per usable core
    image_time_limit_s: float = Field(default=3.0, gt=0)
    job_time_limit_s: int | None = Field(default=None, ge=5)
    retry_backoff_max_s: int = Field(default=120, ge=1)
    max_job_retries: int = Field(default=10, ge=0)
    max_deliveries: int = Field(default=3, ge=1)
    # A worker silent this long is taken for gone and its jobs go back to their queues.
    # Longer than any pause a live worker survives (GC, a Redis blip); far below 60 s.
    heartbeat_ttl_s: int = Field(default=20, ge=2, le=3600)
    # An accepted upload with no result this long after it was queued is queued again.
    pending_requeue_after_s: int = Field(default=300, ge=1)

    metrics_port: int = Field(default=9808, ge=0, le=65535)
    webhook_secret: SecretStr | None = None
    # How long the webhook waits on a silent client (request line, headers, body, or idle
    # keep-alive) before closing its connection and freeing the thread serving it.
    webhook_timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("allowed_buckets", "allowed_roots", "kinds", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("term_cache_dir", "term_lists_dir")
    @classmethod
    def _expand_home(cls, path: Path | None) -> Path | None:
        return path.expanduser() if path is not None else None

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: tuple[str, ...]) -> tuple[str, ...]:
        try:
            return parse_kinds(kinds)
        except ConfigError as exc:
            raise ValueError(f"CAPTIONER_KINDS: {exc}") from exc

    @field_validator("allowed_roots")
    @classmethod
    def _absolute_roots(cls, roots: tuple[Path, ...]) -> tuple[Path, ...]:
        for root in roots:
            if not root.is_absolute():
                raise ValueError(f"CAPTIONER_ALLOWED_ROOTS entries must be absolute: {root}")
        return tuple(root.resolve() for root in roots)

    def as_env(self) -> dict[str, str]:
        """`CAPTIONER_*` variables that give a child process (a worker) these same settings."""
        env: dict[str, str] = {}
        for name, value in self:
            if value is None:
                continue
            if isinstance(value, tuple):
                text = ",".join(str(part) for part in value)
            elif isinstance(value, SecretStr):
                text = value.get_secret_value()
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            env[f"CAPTIONER_{name.upper()}"] = text
        return env

    @model_validator(mode="after")
    def _candidates_need_a_scorer(self) -> Settings:
        if self.candidates > 1 and self.scorer is None:
            raise ValueError(
                "CAPTIONER_CANDIDATES > 1 needs CAPTIONER_SCORER (the candidates are ranked by "
                "its match score): set it, or set CAPTIONER_CANDIDATES=1"
            )
        return self

    @property
    def job_deadline_s(self) -> int:
        """The hard time limit of one job: the biggest job allowed, at the slowest allowed
        pace per image, plus fixed costs (model warm-up, fetch retries, the write).

        Default: 256 items x 3 s + 60 s = 828 s. `CAPTIONER_JOB_TIME_LIMIT_S` overrides it.
        """
        if self.job_time_limit_s is not None:
            return self.job_time_limit_s
        return math.ceil(self.max_job_items * self.image_time_limit_s) + JOB_FIXED_COST_S

    @property
    def visibility_timeout_s(self) -> int:
        """How long Redis waits before handing an unacked job to another worker.

        It must exceed the longest a worker may hold one message: a retry waits up to
        `retry_backoff_max_s` (held unacked until its countdown ends), then runs for up to
        `job_deadline_s`, behind the other jobs in flight under the threads pool (they take
        turns on the model); a quarter more absorbs clock skew and slow acks (celery#5935).
        Default (prefork): (828 + 120) x 1.25 = 1185 s. Shorter means faster recovery from a
        vanished worker; shorter than a job means jobs run twice.
        """
        turns = self.jobs_in_flight if self.pool == "threads" else 1
        held = self.job_deadline_s * turns + self.retry_backoff_max_s
        return math.ceil(held * 1.25)

    @property
    def held_ttl_s(self) -> int:
        """Life of a worker's `held` set without a beat: longer than any delivery in it, so
        only a worker gone for good (and never reaped) leaves one behind, for this long."""
        return 2 * self.visibility_timeout_s


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(describe_invalid(exc)) from exc


def describe_invalid(exc: ValidationError) -> str:
    """One line naming each bad variable, its value and what it must be."""
    problems = []
    for error in exc.errors():
        name = "CAPTIONER_" + str(error["loc"][0]).upper() if error["loc"] else "a setting"
        shown = isinstance(error.get("input"), str | int) and "secret" not in name.lower()
        value = f"={error['input']!r}" if shown else ""
        reason = error["msg"].removeprefix("Value error, ")
        problems.append(f"{name}{value}: {reason}")
    return "; ".join(problems) + ": fix or unset it (README, Settings)"
