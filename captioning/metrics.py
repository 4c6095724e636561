"""Every Prometheus metric of the captioner, in one place.

Names follow Prometheus conventions: `captioner_` prefix, base units, `_total` counters. No
label ever holds a URI, key or job id, so cardinality stays fixed however many images flow.
Gauges declare a `multiprocess_mode` so they aggregate correctly under a prefork pool.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STAGES = ("fetch", "decode", "generate", "write")
#: The `kind` label of work done once for all the kinds of a job (fetch, decode, write).
SHARED = "shared"

# Seconds: GPU batches take 0.05-30 s; fetches and writes are usually sub-second.
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
END_TO_END_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Probabilities: finer at the ends, where good (near 1) and bad (near 0) captions gather.
SCORE_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)

IMAGES = Counter(
    "captioner_images_total",
    "Images finished, by final status, queue and kind (one per row: an image asked for two "
    "kinds counts once for each).",
    ["status", "queue", "kind"],
)
IMAGE_ERRORS = Counter(
    "captioner_image_errors_total", "Failed images by error class and kind.", ["reason", "kind"]
)
DEDUPED = Counter(
    "captioner_images_deduplicated_total",
    "Images whose caption was copied from an earlier row with the same bytes, model and prompt.",
)
JOBS = Counter(
    "captioner_jobs_total",
    "Jobs handled, by outcome (done, retried, dead, invalid) and queue.",
    ["outcome", "queue"],
)
BATCH_SIZE = Histogram(
    "captioner_batch_size_images",
    "Images per model micro-batch, by kind.",
    ["kind"],
    buckets=BATCH_BUCKETS,
)
STAGE_SECONDS = Histogram(
    "captioner_stage_seconds",
    "Seconds spent per stage of a job (fetch, decode, generate, write), by kind "
    "(`shared` for the stages every kind of a job shares).",
    ["stage", "kind"],
    buckets=STAGE_BUCKETS,
)
END_TO_END_SECONDS = Histogram(
    "captioner_end_to_end_seconds",
    "Seconds from enqueue to the image's row being written, by queue and kind.",
    ["queue", "kind"],
    buckets=END_TO_END_BUCKETS,
)
MATCH_PROBABILITY = Histogram(
    "captioner_caption_match_probability",
    "ITM match probability of each kept caption, by captioning model and scorer.",
    ["model", "scorer"],
    buckets=SCORE_BUCKETS,
)
MODEL_LOADED = Gauge(
    "captioner_model_loaded", "1 once the model is loaded.", multiprocess_mode="max"
)
MODEL_WARMED = Gauge(
    "captioner_model_warmed",
    "1 once a warm-up generate() has run; readiness waits for it.",
    multiprocess_mode="max",
)
GPU_MEMORY_BYTES = Gauge(
    "captioner_gpu_memory_bytes", "GPU memory allocated by torch.", multiprocess_mode="max"
)
BUILD_INFO = Gauge(
    "captioner_build_info",
    "Always 1; labels say which version and model run.",
    ["version", "model"],
    multiprocess_mode="max",
)
