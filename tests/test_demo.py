"""`captioner demo`: the embedded default, as a new user runs it (private Redis, SQLite, files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.imagefactory import PHOTOS_DIR


def test_demo_captions_every_sample_photo_and_says_they_are_placeholders(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")
    } | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "cli", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    photos = [p.name for p in PHOTOS_DIR.iterdir() if p.suffix in (".png", ".jpg")]
    ok_lines = [line for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert len(ok_lines) == len(photos) == 5
    assert all(any(name in line for line in ok_lines) for name in photos)
    assert "placeholder" in done.stdout and "tiny-random-blip2" in done.stdout
    assert (tmp_path / ".captioner-demo" / "captions.db").exists()
    sidecars = list((tmp_path / ".captioner-demo" / "sidecars").rglob("*.json"))
    assert len(sidecars) == 5
