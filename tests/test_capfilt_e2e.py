"""End to end with scores: CLI (two prompts) -> Redis -> worker (tiny BLIP-2 + tiny ITM scorer,
CapFilt best-of-3) -> PostgreSQL rows and S3 sidecars; `results --min-score` filters them."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from captioning.embedded import PrivateRedis
from captioning.results import CaptionRow, ResultsStore
from captioning.settings import Settings
from tests.conftest import free_port, settings_env, sidecar, wait_for_log, wait_for_rows
from tests.imagefactory import hostile_files, photo_bytes
from tests.test_pipeline import captioner
from workers.runtimes.tiny import TINY_SCORER

QUESTION = "Question: what is the style of this image? Answer:"


@pytest.fixture(scope="module")
def scoring_settings(settings: Settings) -> Iterator[Settings]:
    """The session's services, with a broker of its own: the session worker (no scorer)
    must not take these jobs."""
    with PrivateRedis() as broker:
        yield settings.model_copy(
            update={"broker_url": broker.url, "scorer": TINY_SCORER, "candidates": 3,
                    "metrics_port": free_port()}
        )


@pytest.fixture(scope="module")
def scoring_worker(
    scoring_settings: Settings, results: ResultsStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    log_path = tmp_path_factory.mktemp("scoring-worker") / "worker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--loglevel", "INFO"],
            env=settings_env(scoring_settings), stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_for_log(log_path, "ready", process, timeout=120)
        yield log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def test_two_prompts_scored_with_candidates_into_rows_and_sidecars(
    scoring_settings: Settings, scoring_worker: Path, results: ResultsStore, s3, prefix: str
) -> None:
    photos = dict(list(photo_bytes().items())[:3])
    broken_name, (broken, _) = next(iter(hostile_files(1000).items()))
    files = {**photos, broken_name: broken}
    for name, data in files.items():
        s3.put_object(Bucket="photos", Key=prefix + name, Body=data)
    uris = [f"s3://photos/{prefix}{name}" for name in files]

    out = captioner(scoring_settings, "enqueue", *uris, "--prompt", "", "--prompt", QUESTION)
    assert "enqueued 4 images in 1 jobs" in out

    rows = wait_for_rows(results, f"s3://photos/{prefix}", 2 * len(uris))
    assert len(rows) == 2 * len(uris)
    assert "one vision pass per image feeds both" in scoring_worker.read_text()
    by_key = {(r.key.removeprefix(prefix), r.prompt): r for r in rows}
    for name in photos:
        for prompt in ("", QUESTION):
            row = by_key[(name, prompt)]
            assert row.status == "ok", row.error
            assert_scored(row)
    for prompt in ("", QUESTION):
        failed = by_key[(broken_name, prompt)]
        assert failed.status == "failed" and failed.error
        assert failed.match_probability is None and failed.candidates is None

    # Sidecars: the first prompt at <key>.json, the second next to it, both with the scores.
    name = next(iter(photos))
    first = by_key[(name, "")]
    second = by_key[(name, QUESTION)]
    suffix = hashlib.sha256(QUESTION.encode()).hexdigest()[:12]
    for row, key in ((first, f"{prefix}{name}.json"), (second, f"{prefix}{name}.{suffix}.json")):
        body = sidecar(s3, f"captions/photos/{key}")
        assert body["prompt"] == row.prompt and body["caption"] == row.caption
        assert body["match_probability"] == pytest.approx(row.match_probability)
        assert body["candidates"] == row.candidates and body["scorer"] == TINY_SCORER

    # `results --min-score`: the rows at or above the threshold, no unscored ones.
    threshold = sorted(r.match_probability or 0.0 for r in rows if r.status == "ok")[3]
    listed = captioner(scoring_settings, "results", "--prefix", f"s3://photos/{prefix}",
                       "--min-score", str(threshold), "--format", "jsonl")
    records = [json.loads(line) for line in listed.splitlines()]
    assert records and all(r["match_probability"] >= threshold for r in records)
    assert len(records) == sum(
        1 for r in rows if r.match_probability is not None and r.match_probability >= threshold
    )


def assert_scored(row: CaptionRow) -> None:
    assert row.scorer == TINY_SCORER
    assert row.match_probability is not None and 0.0 <= row.match_probability <= 1.0
    assert row.itc_cosine is not None and -1.0 <= row.itc_cosine <= 1.0
    assert row.candidates is not None and len(row.candidates) == 3
    best = max(row.candidates, key=lambda c: c["match_probability"])
    assert row.caption == best["text"]
    assert row.match_probability == pytest.approx(best["match_probability"])
