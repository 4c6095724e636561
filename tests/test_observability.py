"""Worker metrics, the health probe and the queue exporter, scraped over real HTTP."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from captioning.embedded import PrivateRedis
from captioning.messages import BULK_QUEUE, REALTIME_QUEUE
from captioning.settings import Settings
from tests.conftest import scrape, send_backlog, settings_env
from tests.imagefactory import photo_bytes
from tests.test_pipeline import captioner, upload


def wait_for_sample(port: int, name: str, minimum: float, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = scrape(port).get(name, 0.0)
        if value >= minimum or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


@pytest.mark.usefixtures("worker")
def test_worker_metrics_count_images_and_stages(
    settings: Settings, s3, prefix: str, rows_under
) -> None:
    before = scrape(settings.metrics_port)
    ok_key = 'captioner_images_total{kind="caption",queue="captions.realtime",status="ok"}'
    failed_key = 'captioner_images_total{kind="caption",queue="captions.realtime",status="failed"}'
    photo = photo_bytes()["coffee.png"]
    uris = upload(s3, "photos", prefix, {"a.png": photo, "b.png": photo})
    captioner(settings, "enqueue", *uris, f"s3://photos/{prefix}missing.png")
    rows_under(f"s3://photos/{prefix}", 3)

    wait_for_sample(settings.metrics_port, ok_key, before.get(ok_key, 0) + 2)
    after = scrape(settings.metrics_port)
    assert after[ok_key] - before.get(ok_key, 0) == 2
    assert after[failed_key] - before.get(failed_key, 0) == 1
    assert after['captioner_image_errors_total{kind="caption",reason="ObjectMissing"}'] >= 1
    assert after["captioner_model_loaded{}"] == 1
    assert after["captioner_model_warmed{}"] == 1
    for stage, kind in (("fetch", "shared"), ("decode", "shared"), ("generate", "caption"),
                        ("write", "shared")):
        assert after[f'captioner_stage_seconds_count{{kind="{kind}",stage="{stage}"}}'] >= 1
    assert after[
        'captioner_end_to_end_seconds_count{kind="caption",queue="captions.realtime"}'
    ] >= 3
    assert not any("s3://" in name or prefix in name for name in after)


@pytest.mark.usefixtures("worker")
def test_health_probe_passes_for_a_warmed_worker(settings: Settings) -> None:
    env = settings_env(settings)
    for args in (["health"], ["health", "--ready"]):
        done = subprocess.run(
            [sys.executable, "-m", "cli", *args], env=env, capture_output=True,
            text=True, timeout=60, check=False,
        )
        assert done.returncode == 0, done.stderr


def test_health_probe_fails_without_a_worker() -> None:
    with PrivateRedis() as broker:
        done = subprocess.run(
            [sys.executable, "-m", "cli", "health", "--ready"],
            env={**settings_env(Settings()), "CAPTIONER_BROKER_URL": broker.url},
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert done.returncode == 1
    assert "is the worker running" in done.stderr


def test_exporter_reports_waiting_images_per_queue(
    exporter: int, backlog_broker: PrivateRedis
) -> None:
    send_backlog(backlog_broker.url, {BULK_QUEUE: [32] * 10 + [5], REALTIME_QUEUE: [1, 2]})
    samples = scrape(exporter)
    assert samples['captioner_queue_messages{queue="captions.bulk"}'] == 11
    assert samples['captioner_queue_images{queue="captions.bulk"}'] == 325
    assert samples['captioner_queue_images{queue="captions.realtime"}'] == 3
    assert 0 <= samples['captioner_queue_oldest_age_seconds{queue="captions.bulk"}'] < 60
    assert samples["captioner_inflight_messages{}"] == 0
    assert samples["captioner_dead_letter_messages{}"] == 0
    assert samples["captioner_exporter_broker_up{}"] == 1
