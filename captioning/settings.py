"""One typed settings object, read once from `CAPTIONER_*` environment variables.

Every field has a default that works on a laptop; production overrides them through the
environment (Kubernetes ConfigMap/Secret). AWS credentials are deliberately absent: boto3's
own chain (env, profile, IRSA) provides them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024

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

    model: str = "Salesforce/blip2-opt-2.7b"
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
    job_time_limit_s: int = Field(default=900, ge=10)

    metrics_port: int = Field(default=9808, ge=0, le=65535)
    webhook_secret: SecretStr | None = None

    @field_validator("allowed_buckets", "allowed_roots", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("allowed_roots")
    @classmethod
    def _absolute_roots(cls, roots: tuple[Path, ...]) -> tuple[Path, ...]:
        for root in roots:
            if not root.is_absolute():
                raise ValueError(f"CAPTIONER_ALLOWED_ROOTS entries must be absolute: {root}")
        return tuple(root.resolve() for root in roots)

    @property
    def visibility_timeout_s(self) -> int:
        """Longer than the longest job plus its longest retry countdown (celery#5935)."""
        return self.job_time_limit_s * 2 + 600


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
