"""A worker that cannot do its job stops at start with a message that says what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from captioning.embedded import PrivateRedis
from captioning.settings import Settings
from tests.conftest import settings_env


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_worker_without_the_captions_table_stops_and_says_run_db_upgrade(
    tmp_path: Path, pool: str
) -> None:
    with PrivateRedis() as broker:
        env = settings_env(Settings(model="tiny-random-blip2", metrics_port=0)) | {
            "CAPTIONER_BROKER_URL": broker.url,
            "CAPTIONER_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}",
            "CAPTIONER_POOL": pool,
        }
        done = subprocess.run(
            [sys.executable, "-m", "cli", "worker"], env=env, capture_output=True,
            text=True, timeout=120, check=False,
        )
    output = done.stdout + done.stderr
    assert "run `captioner db upgrade` once before starting workers" in output
    assert " ready: model " not in output
