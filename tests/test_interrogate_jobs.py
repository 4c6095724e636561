"""The interrogate kind in jobs: in-process through process_job, then end to end through a
worker serving caption, tags and interrogate on real Redis, PostgreSQL and SeaweedFS. Tiny
BLIP-2, WD14 and CLIP twins; small term lists, so a worker starts in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from captioning.embedded import PrivateRedis
from captioning.kinds import annotators
from captioning.messages import BULK_QUEUE, CaptionJob, JobItem
from captioning.results import ResultsStore
from captioning.settings import Settings
from tests.conftest import settings_env, wait_for_log, wait_for_rows
from tests.imagefactory import hostile_files, photo_bytes
from workers.context import WorkerContext
from workers.images import decode_image
from workers.pixels import ModelPixels
from workers.runtimes.base import Annotation, Results, Runtime
from workers.runtimes.interrogate import Interrogator
from workers.runtimes.tiny import TINY_CLIP, TINY_MODEL, TINY_TAGGER
from workers.tasks import process_job

KINDS = ("caption", "tags", "interrogate")
TERM_LISTS = {
    "artists": "Hokusai\nClaude Monet\nGreg Rutkowski\n",
    "flavors": "highly detailed\nsharp focus\nmoody lighting\n8k\nbokeh\nfilm grain\n",
    "mediums": "a photo\na painting\na 3D render\n",
    "movements": "ukiyo-e\nimpressionism\nsurrealism\n",
}


def write_term_lists(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in TERM_LISTS.items():
        (directory / f"{name}.txt").write_text(text)
    return directory


def kind_settings(tmp: Path, **overrides: object) -> Settings:
    fields: dict[str, object] = {
        "model": TINY_MODEL, "tagger_model": TINY_TAGGER, "clip_model": TINY_CLIP,
        "kinds": KINDS, "device": "cpu", "batch_size": 3, "max_new_tokens": 6,
        "term_lists_dir": write_term_lists(tmp / "lists"), "term_cache_dir": tmp / "terms",
        "interrogate_terms": 4, "max_image_bytes": 2_000_000, "max_image_pixels": 20_000_000,
        **overrides,
    }
    return Settings(**fields)


class CountingRuntime:
    """A real runtime, counting the images it annotates."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.images = 0
        self.prompts: list[tuple[str, ...]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.runtime, name)

    def annotate(
        self, pixels: Sequence[ModelPixels], prompt: str, earlier: Sequence[Results]
    ) -> list[Annotation]:
        self.images += len(pixels)
        return self.runtime.annotate(pixels, prompt, earlier)

    def annotate_prompts(
        self, pixels: Sequence[ModelPixels], prompts: Sequence[str]
    ) -> list[list[Annotation]]:
        """The caption kind's entry point: every prompt of a job from one vision pass."""
        self.images += len(pixels)
        self.prompts.append(tuple(prompts))
        return self.runtime.annotate_prompts(pixels, prompts)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("interrogate-images").resolve()
    for name, data in photo_bytes().items():
        (directory / name).write_bytes(data)
    for name, (data, _) in hostile_files(2_000_000).items():
        (directory / name).write_bytes(data)
    return directory


@pytest.fixture(scope="module")
def ctx(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerContext]:
    tmp = tmp_path_factory.mktemp("interrogate-ctx")
    settings = kind_settings(tmp, database_url=f"sqlite:///{tmp / 'rows.db'}",
                             allowed_roots=(root,))
    ResultsStore(settings.database_url).create_schema()
    context = WorkerContext.create(settings)
    yield context
    context.close()


def job_for(root: Path, names: Sequence[str], kinds: Sequence[str], settings: Settings,
            prompt: str = "") -> CaptionJob:
    return CaptionJob.create(
        items=tuple(JobItem(uri=(root / name).as_uri()) for name in names),
        annotators=annotators(settings, kinds), prompts=(prompt,), source="cli",
    )


def test_a_worker_serving_interrogate_loads_the_caption_model_it_builds_on(
    tmp_path: Path,
) -> None:
    settings = kind_settings(tmp_path, kinds=("interrogate",),
                             database_url=f"sqlite:///{tmp_path / 'rows.db'}")
    ResultsStore(settings.database_url).create_schema()
    context = WorkerContext.create(settings)
    try:
        assert list(context.runtimes) == ["caption", "interrogate"]
        assert context.runtimes["interrogate"].name == f"{TINY_MODEL}+{TINY_CLIP}"
        assert context.runtimes["interrogate"].is_placeholder
    finally:
        context.close()


def test_one_caption_per_image_serves_both_kinds_and_the_prompt_starts_with_it(
    ctx: WorkerContext, root: Path
) -> None:
    names = sorted(photo_bytes())
    caption = CountingRuntime(ctx.runtimes["caption"])
    counting = WorkerContext(**{**ctx.__dict__, "runtimes": {**ctx.runtimes, "caption": caption}})
    prompt = "Question: what is it? Answer:"
    outcome = process_job(job_for(root, names, ("caption", "interrogate"), ctx.settings, prompt),
                          counting, BULK_QUEUE)

    assert caption.images == len(names)  # generated once per image, not once per kind
    rows = {(r.kind, Path(r.key).name): r for r in outcome.rows}
    assert len(rows) == 2 * len(names)
    for name in names:
        captioned, interrogated = rows["caption", name], rows["interrogate", name]
        assert captioned.status == interrogated.status == "ok"
        assert interrogated.model == f"{TINY_MODEL}+{TINY_CLIP}"
        assert interrogated.prompt == prompt  # the caption's prompt keys its prompt
        terms = [term for listed in interrogated.tags.values() for term in listed]
        assert 1 <= len(terms) <= 4
        assert interrogated.caption.startswith(f"{captioned.caption}, " if captioned.caption
                                               else terms[0])
        assert all(term in interrogated.caption for term in terms)
        assert set(interrogated.tags) <= {"artists", "flavors", "mediums", "movements",
                                          "trendings"}


def test_interrogate_alone_writes_only_its_rows_with_the_models_own_results(
    ctx: WorkerContext, root: Path
) -> None:
    names = ["chelsea.png", "coffee.png"]
    outcome = process_job(job_for(root, names, ("interrogate",), ctx.settings), ctx, BULK_QUEUE)
    assert [(r.kind, r.status) for r in outcome.rows] == [("interrogate", "ok")] * 2

    interrogator = ctx.runtimes["interrogate"]
    assert isinstance(interrogator, Interrogator)
    # Decoded as the job decodes: for its kinds only (not at the tagger's full resolution).
    size = max(ctx.runtimes["caption"].decode_size, interrogator.decode_size)
    images = [decode_image((root / name).read_bytes(), max_pixels=20_000_000,
                           target_size=size).image for name in names]
    captions = ctx.runtimes["caption"].annotate(
        [ctx.runtimes["caption"].to_pixels(image) for image in images], "", [{}, {}]
    )
    direct = interrogator.annotate(
        [interrogator.to_pixels(image) for image in images], "",
        [{"caption": caption} for caption in captions],
    )
    assert [r.caption for r in outcome.rows] == [a.text for a in direct]
    assert [r.tags for r in outcome.rows] == [a.tags for a in direct]


def test_interrogate_alone_captions_only_the_prompt_it_reads(
    ctx: WorkerContext, root: Path
) -> None:
    caption = CountingRuntime(ctx.runtimes["caption"])
    counting = WorkerContext(**{**ctx.__dict__, "runtimes": {**ctx.runtimes, "caption": caption}})
    job = CaptionJob.create(
        items=(JobItem(uri=(root / "chelsea.png").as_uri()),),
        annotators=annotators(ctx.settings, ("interrogate",)),
        prompts=("", "Question: what is the style of this image? Answer:"), source="cli",
    )
    outcome = process_job(job, counting, BULK_QUEUE)

    assert caption.prompts == [("",)]  # not one caption per prompt of the job
    assert [(r.kind, r.prompt, r.status) for r in outcome.rows] == [("interrogate", "", "ok")]


def test_bad_images_fail_every_kind_once_and_another_clip_is_refused(
    ctx: WorkerContext, root: Path
) -> None:
    bad = hostile_files(2_000_000)
    names = ["rocket.jpg", *bad]
    outcome = process_job(job_for(root, names, KINDS, ctx.settings), ctx, BULK_QUEUE)
    assert len(outcome.rows) == 3 * len(names)
    for row in outcome.rows:
        expected = bad.get(Path(row.key).name, (b"", None))[1]
        if expected is None:
            assert row.status == "ok" and row.caption, row
        else:
            assert row.status == "failed" and row.error.startswith(expected), row

    other = CaptionJob.create(
        items=(JobItem(uri=(root / "rocket.jpg").as_uri()),),
        annotators={"interrogate": f"{TINY_MODEL}+openai/clip-vit-base-patch32"},
        prompts=("",), source="cli",
    )
    [refused] = process_job(other, ctx, BULK_QUEUE).rows
    assert refused.status == "failed"
    assert refused.error.startswith("ModelMismatch")
    assert "CAPTIONER_MODEL and CAPTIONER_CLIP_MODEL" in refused.error


# --- end to end ---------------------------------------------------------------------------


def test_backfill_with_three_kinds_leaves_three_rows_per_image(
    postgres_url: str, seaweed, s3, prefix: str, tmp_path: Path
) -> None:
    """captioner backfill -> Redis -> `captioner worker` serving caption, tags, interrogate ->
    PostgreSQL rows and S3 sidecars; a private Redis, so no other worker takes the jobs."""
    photos = photo_bytes()
    bad = {"broken.jpg": photos["rocket.jpg"][:600], "text.jpg": b"not an image"}
    for name, data in {**photos, **bad}.items():
        s3.put_object(Bucket="photos", Key=prefix + name, Body=data)
    with PrivateRedis() as broker:
        settings = kind_settings(
            tmp_path, broker_url=broker.url, database_url=postgres_url,
            s3_endpoint_url=seaweed.endpoint, allowed_buckets=("photos", "uploads"),
            results_uri="s3://uploads/captions", metrics_port=0,
        )
        results = ResultsStore(settings.database_url)
        results.create_schema()
        log_path = tmp_path / "worker.log"
        with open(log_path, "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "cli", "worker"],
                                      env=settings_env(settings), stdout=log,
                                      stderr=subprocess.STDOUT)
        try:
            wait_for_log(log_path, "ready", worker, timeout=180)
            def backfill() -> str:
                done = subprocess.run(
                    [sys.executable, "-m", "cli", "backfill", f"s3://photos/{prefix}",
                     "--kind", ",".join(KINDS)],
                    env=settings_env(settings.model_copy(update={"kinds": ("caption",)})),
                    capture_output=True, text=True, timeout=120, check=False,
                )
                assert done.returncode == 0, done.stderr
                return done.stdout

            images = len(photos) + len(bad)
            assert f"enqueued {images} images in 1 jobs" in backfill()
            rows = wait_for_rows(results, f"s3://photos/{prefix}", 3 * images, timeout=180)
            assert "enqueued 0 images in 0 jobs" in backfill()  # every kind has its rows
        finally:
            worker.terminate()
            worker.wait(timeout=60)
            results.dispose()

    assert len(rows) == 3 * images, [(r.kind, r.key) for r in rows]
    by_image: dict[str, dict[str, object]] = {}
    for row in rows:
        by_image.setdefault(Path(row.key).name, {})[row.kind] = row
    assert set(by_image) == {*photos, *bad}
    for name, kinds in by_image.items():
        assert set(kinds) == set(KINDS), name
        for row in kinds.values():
            assert row.status == ("failed" if name in bad else "ok"), row
    good = [kinds["interrogate"] for name, kinds in by_image.items() if name not in bad]
    assert all(row.model == f"{TINY_MODEL}+{TINY_CLIP}" and row.tags for row in good)
    sidecar = s3.get_object(Bucket="uploads",
                            Key=f"captions/photos/{good[0].key}.interrogate.json")
    record = json.loads(sidecar["Body"].read())
    assert (record["caption"], record["tags"]) == (good[0].caption, good[0].tags)


def test_demo_with_interrogate_uses_the_clip_twin_and_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")} | {
        "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
        "CAPTIONER_KINDS": "caption,interrogate",
        "CAPTIONER_TERM_LISTS_DIR": str(write_term_lists(tmp_path / "lists")),
        "CAPTIONER_TERM_CACHE_DIR": str(tmp_path / "terms"),
    }
    done = subprocess.run([sys.executable, "-m", "cli", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ok_lines = [line for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert sum(" interrogate " in line for line in ok_lines) == 5
    assert sum(" caption " in line for line in ok_lines) == 5
    assert "tiny-random-clip, a CLIP with random weights" in done.stdout
    assert len(list((tmp_path / "terms").glob("*.safetensors"))) == 1
