"""`captioner demo`: a folder captioned end to end on a private Redis, SQLite and local files."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import captioning
from captioning.errors import ConfigError
from captioning.messages import REALTIME_QUEUE
from captioning.results import CaptionRow, ResultsStore
from captioning.settings import Settings, get_settings
from cli.arguments import positive
from cli.results import write_rows

log = logging.getLogger("captioner")

SAMPLES_DIR = Path(captioning.__file__).parent / "samples"
TINY_MODEL = "tiny-random-blip2"
REAL_MODEL = "Salesforce/blip2-opt-2.7b"
TINY_TAGGER = "tiny-random-wd14"
REAL_TAGGER = "SmilingWolf/wd-vit-tagger-v3"
TINY_CLIP = "tiny-random-clip"
REAL_CLIP = "openai/clip-vit-large-patch14"


def add_parsers(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo", help="caption a folder end to end on a private Redis, SQLite and local files"
    )
    demo.add_argument("directory", nargs="?", type=Path, default=SAMPLES_DIR,
                      help="folder of images (default: the bundled sample photos)")
    demo.add_argument("--timeout", type=positive, default=600, help="seconds to wait")
    demo.set_defaults(run=cmd_demo)


def choose(variable: str, real: str, twin: str, files: Sequence[str] | None = None) -> str:
    """The model `variable` names if set; else `real` if already cached; else its twin."""
    if os.environ.get(variable):
        return os.environ[variable]
    from workers.runtimes.loading import weights_cached

    return real if weights_cached(real, files=files) else twin


def choose_demo_model() -> str:
    return choose("CAPTIONER_MODEL", REAL_MODEL, TINY_MODEL)


def choose_demo_tagger() -> str:
    from workers.runtimes.wd14 import TAGGER_FILES

    return choose("CAPTIONER_TAGGER_MODEL", REAL_TAGGER, TINY_TAGGER, TAGGER_FILES)


def cmd_demo(args: argparse.Namespace) -> int:
    from captioning.broker import create_app
    from captioning.embedded import PrivateRedis
    from captioning.uris import file_uri
    from producer.enqueue import JobSender, enqueue_uris
    from producer.keys import is_image_key

    get_settings()  # the worker it starts reads CAPTIONER_* too: a bad one is one line here
    directory = args.directory.resolve()
    images = sorted(p for p in directory.rglob("*") if p.is_file() and is_image_key(p.name))
    if not images:
        raise ConfigError(
            f"no images (.jpg, .png, .webp, ...) under {directory}: give a folder of images"
        )
    model = choose_demo_model()
    if model == TINY_MODEL:
        print(
            "note: using tiny-random-blip2, a BLIP-2 with random weights: its captions are "
            f"placeholder noise. For real captions, download {REAL_MODEL} into the Hugging Face "
            "cache (huggingface-cli download ...) or set CAPTIONER_MODEL to a local directory."
        )
    workdir = Path(os.environ.get("CAPTIONER_DEMO_DIR", Path.cwd() / ".captioner-demo"))
    workdir.mkdir(parents=True, exist_ok=True)
    database = workdir / "captions.db"
    database.unlink(missing_ok=True)
    with PrivateRedis() as broker:
        settings = Settings(
            broker_url=broker.url,
            database_url=f"sqlite:///{database}",
            allowed_roots=(directory,),
            model=model,
            tagger_model=choose_demo_tagger(),
            clip_model=choose("CAPTIONER_CLIP_MODEL", REAL_CLIP, TINY_CLIP),
            results_uri=(workdir / "sidecars").as_uri(),
            metrics_port=0,
        )
        expected = len(images) * len(settings.kinds)  # a row per image and kind
        if "tags" in settings.kinds and settings.tagger_model == TINY_TAGGER:
            print(f"note: using {TINY_TAGGER}, a WD14 tagger with random weights: its tags are "
                  f"placeholder noise. For real tags, download {REAL_TAGGER} (hf download ...) "
                  "or set CAPTIONER_TAGGER_MODEL to a directory with model.onnx and "
                  "selected_tags.csv.")
        if "interrogate" in settings.kinds and settings.clip_model == TINY_CLIP:
            print(f"note: using {TINY_CLIP}, a CLIP with random weights: the terms of its "
                  f"prompts are placeholder noise. For real prompts, download {REAL_CLIP} (hf "
                  "download ...) or set CAPTIONER_CLIP_MODEL to a save_pretrained directory. "
                  "The first start encodes the 111,866 terms once (cached in "
                  "CAPTIONER_TERM_CACHE_DIR).")
        env = {**os.environ, **settings.as_env()}
        results = ResultsStore(settings.database_url)
        results.create_schema()
        worker = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--loglevel", "WARNING"], env=env
        )
        try:
            with JobSender(create_app(settings, one_shot=True), REALTIME_QUEUE) as sender:
                enqueue_uris((file_uri(p) for p in images), sender, settings, batch_size=8)
            print(f"enqueued {len(images)} images from {directory}; waiting for the worker...")
            rows = wait_for_rows(results, expected, args.timeout, worker)
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    write_rows(rows, "table", sys.stdout)
    print(f"results: {database} (sidecars in {workdir / 'sidecars'})")
    return 0 if len(rows) == expected else 1


def wait_for_rows(
    results: ResultsStore, expected: int, timeout: float, worker: subprocess.Popen[bytes]
) -> list[CaptionRow]:
    deadline = time.monotonic() + timeout
    while True:
        rows = results.rows()
        if len(rows) >= expected:
            return rows
        if worker.poll() is not None:
            raise ConfigError(f"the demo worker exited with code {worker.returncode}")
        if time.monotonic() > deadline:
            log.error("timed out: %d of %d images captioned", len(rows), expected)
            return rows
        time.sleep(0.5)
