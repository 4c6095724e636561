"""Processes the fault-injection tests own and break: workers, Redis, PostgreSQL, TLS certs.

Everything here binds 127.0.0.1 on free ports and is started by the test that kills it, so
no test ever stops a service another test (or another engineer) is using.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery import Celery

from captioning.embedded import free_port, redis_server_binary
from captioning.keys import deliveries_key
from captioning.messages import BULK_QUEUE, TASK_NAME, CaptionJob, JobItem
from captioning.results import CaptionRow, ResultsStore
from captioning.settings import Settings
from tests.imagefactory import encode

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def wait_until(check: Callable[[], object], timeout: float, what: str, every: float = 0.1):
    """Poll `check` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(child) for child in text.split()]


@dataclass
class Worker:
    """`captioner worker` in its own session (process group), logging to a file."""

    env: Mapping[str, str]
    log_path: Path
    concurrency: int = 1
    process: subprocess.Popen[bytes] | None = None

    def start(self, *, ready_timeout: float = 120) -> Worker:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cli", "worker", "--loglevel", "INFO",
                 "--concurrency", str(self.concurrency)],
                env=dict(self.env), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_for_log("ready", ready_timeout, count=self.concurrency)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float, count: int = 1) -> None:
        def seen() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"worker exited {self.process.returncode}:\n"
                                     f"{self.log()[-3000:]}")
            return self.log().count(text) >= count

        wait_until(seen, timeout, f"{text!r} in the worker log", every=0.2)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pool_pids(self) -> list[int]:
        return children_of(self.pid)

    def kill_pool(self) -> int:
        """SIGKILL the pool process, as the OOM killer would; returns how many died."""
        pids = self.pool_pids()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return len(pids)

    def kill_all(self) -> None:
        """SIGKILL the whole worker at once, as when a spot VM vanishes."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (warm shutdown) and wait; SIGKILL if it overstays. Returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill_all()
        return self.process.returncode


@dataclass
class RedisServer:
    """A private redis-server that can be killed and started again on the same port."""

    directory: Path
    password: str | None = None
    tls: TlsFiles | None = None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [redis_server_binary(), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                "no", "--dir", str(self.directory)]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file",
                     str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                     "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _pings(client), 10, "the private redis-server")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost (openssl)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=captioner test CA", "-keyout", str(ca_key), "-out", str(ca))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return TlsFiles(ca=ca, cert=cert, key=key)


@dataclass
class PrivatePostgres:
    """A throwaway PostgreSQL 15 cluster run as the `postgres` user (it refuses root)."""

    tls: TlsFiles | None = None
    port: int = field(default_factory=free_port)
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="captioner-pg-")))

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True,
                       capture_output=True, timeout=120)

    def init(self) -> PrivatePostgres:
        shutil.chown(self.directory, "postgres", "postgres")
        data = self.directory / "data"
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U",
                          "postgres", "--no-sync")
        settings = [f"port = {self.port}", "listen_addresses = '127.0.0.1'",
                    f"unix_socket_directories = '{self.directory}'", "fsync = off"]
        if self.tls:
            for name, path in (("cert", self.tls.cert), ("key", self.tls.key)):
                target = data / f"server.{'crt' if name == 'cert' else 'key'}"
                shutil.copy(path, target)
                shutil.chown(target, "postgres", "postgres")
                target.chmod(0o600)
            settings.append("ssl = on")
        with open(data / "postgresql.conf", "a") as conf:
            conf.write("\n".join(settings) + "\n")
        return self

    def start(self) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.directory / "data"), "-l",
                          str(self.directory / "log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.directory / "data"), "-m",
                          "fast", "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


_OUTAGE_BODY = b'<?xml version="1.0"?><Error><Code>SlowDown</Code><Message>outage</Message></Error>'
OUTAGE_RESPONSE = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n%b"
    % (len(_OUTAGE_BODY), _OUTAGE_BODY)
)


class CountingProxy:
    """A TCP relay that counts the bytes the upstream server sends back to the client.

    During `outage()` it stops relaying: open connections are cut and every request is
    answered `503 SlowDown` (what S3 says when it sheds load) and counted by method.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.bytes_from_upstream = 0
        self.refused: Counter[str] = Counter()
        self._down = False
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @contextlib.contextmanager
    def outage(self) -> Iterator[Counter[str]]:
        self._switch(down=True)
        try:
            yield self.refused
        finally:
            self._switch(down=False)

    def _switch(self, *, down: bool) -> None:
        """Cut every open connection, so the client's next request meets the new mode."""
        with self._lock:
            self._down = down
            cut, self._open = self._open, set()
        for sock in cut:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                down = self._down
                self._open.add(client)
            if down:
                threading.Thread(target=self._refuse, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._open.add(upstream)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _refuse(self, client: socket.socket) -> None:
        """Answer each request head on this connection with a 503 (bodies are not expected:
        an outage test sends GETs and HEADs)."""
        pending = b""
        with contextlib.suppress(OSError), client:
            while chunk := client.recv(65536):
                pending += chunk
                while b"\r\n\r\n" in pending:
                    head, pending = pending.split(b"\r\n\r\n", 1)
                    with self._lock:
                        self.refused[head.split(b" ", 1)[0].decode()] += 1
                    client.sendall(OUTAGE_RESPONSE)

    def _pipe(self, source: socket.socket, target: socket.socket, count: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if count:
                    with self._lock:
                        self.bytes_from_upstream += len(chunk)
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


def worker_env(base: Mapping[str, str], **overrides: object) -> dict[str, str]:
    """`base` (from conftest.settings_env) with CAPTIONER_* overrides: broker_url=... ."""
    extra = {f"CAPTIONER_{name.upper()}": str(value) for name, value in overrides.items()}
    return {**base, **extra}


@dataclass
class Rig:
    """What a worker fault test drives: settings, broker, results, and the workers it starts."""

    settings: Settings
    broker: RedisServer
    results: ResultsStore
    env: dict[str, str]
    logs: Path
    app: Celery
    workers: list[Worker] = field(default_factory=list)

    @property
    def client(self) -> redis.Redis:
        return self.broker.client()

    def start_worker(self) -> Worker:
        worker = Worker(self.env, self.logs / f"worker-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker.start()

    def send(self, uris: list[str], task_id: str) -> None:
        job = CaptionJob(items=tuple(JobItem(uri=u) for u in uris), model=self.settings.model,
                         source="cli")
        self.app.send_task(TASK_NAME, args=[job.to_message()], queue=BULK_QUEUE,
                           task_id=task_id, ignore_result=True)

    def started(self, task_id: str) -> None:
        wait_until(lambda: self.client.get(deliveries_key(task_id)), 60,
                   f"job {task_id} to start", every=0.01)


def slow_png() -> bytes:
    """36 MP of one colour: 120 KB on disk, ~0.5 s to decode. Our stand-in for the image
    that makes a worker run out of memory; the test plays the OOM killer."""
    from PIL import Image

    return encode(Image.new("RGB", (6000, 6000), (120, 30, 200)), "PNG")


def put(s3, prefix: str, files: dict[str, bytes]) -> list[str]:
    for name, data in files.items():
        s3.put_object(Bucket="photos", Key=prefix + name, Body=data)
    return [f"s3://photos/{prefix}{name}" for name in files]


def one_row_each(results: ResultsStore, uris: list[str], timeout: float) -> dict[str, CaptionRow]:
    def rows() -> dict[str, CaptionRow] | None:
        found = [r for uri in uris for r in results.rows(prefix=uri) if r.uri == uri]
        return {r.uri: r for r in found} if len(found) >= len(uris) else None

    by_uri = wait_until(rows, timeout, f"rows for {len(uris)} images", every=0.3)
    assert len(by_uri) == len(uris)
    return by_uri
