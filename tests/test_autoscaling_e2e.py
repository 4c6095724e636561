"""The autoscaling signal end to end: a real Prometheus scrapes the real exporter and worker,
evaluates deploy/prometheus/rules.yml, and answers the ScaledObject's exact query."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kombu import Connection

from captioning.embedded import PrivateRedis, free_port
from captioning.messages import BULK_QUEUE, REALTIME_QUEUE
from captioning.settings import Settings
from tests.conftest import send_backlog

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
SCALED_OBJECT = ROOT / "k8s" / "base" / "worker-scaledobject.yaml"


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise RuntimeError("prometheus not found: apt-get install prometheus (see Makefile)")
    return found


@pytest.fixture
def prometheus(
    tmp_path: Path, exporter: int, settings: Settings, worker: object
) -> Iterator[str]:
    port = free_port()
    shutil.copy(RULES, tmp_path / "rules.yml")
    labels = {"namespace": "captioner"}
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [
            {
                "job_name": "captioner-exporter",
                "static_configs": [{"targets": [f"127.0.0.1:{exporter}"], "labels": labels}],
            },
            {
                "job_name": "captioner-worker",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{settings.metrics_port}"], "labels": labels}
                ],
            },
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=30)


def query(server: str, expr: str) -> float | None:
    url = f"{server}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            result = json.loads(response.read())["data"]["result"]
    except OSError:
        return None
    return float(result[0]["value"][1]) if result else None


def wait_for_value(server: str, expr: str, expected: float, timeout: float = 90) -> float | None:
    """Rules in rules.yml are evaluated every 15 s, so the first value takes a while."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = query(server, expr)
        if value == expected:
            return value
        time.sleep(1)
    return value


def test_scaled_object_query_equals_the_true_backlog(
    backlog_broker: PrivateRedis, prometheus: str
) -> None:
    send_backlog(backlog_broker.url, {BULK_QUEUE: [32] * 70, REALTIME_QUEUE: [1, 2, 3]})
    with Connection(backlog_broker.url) as connection:
        reserved = connection.SimpleQueue(BULK_QUEUE, no_ack=False).get(timeout=5)
        in_flight = len(reserved.payload[0][0]["keys"])
        true_backlog = 69 * 32 + 6 + in_flight

        trigger = yaml.safe_load(SCALED_OBJECT.read_text())["spec"]["triggers"][0]["metadata"]
        assert wait_for_value(prometheus, "captioner:images_backlog", true_backlog) == true_backlog
        assert wait_for_value(prometheus, trigger["query"], true_backlog) == true_backlog

        scaled = query(prometheus, trigger["query"])
        reserved.ack()

    spec = yaml.safe_load(SCALED_OBJECT.read_text())["spec"]

    def keda_replicas(metric: float) -> int:
        """AverageValue: ceil(metric / threshold), clamped to [1, maxReplicaCount] once active."""
        if metric <= float(trigger["activationThreshold"]):
            return spec["minReplicaCount"]
        wanted = math.ceil(metric / float(trigger["threshold"]))
        return min(spec["maxReplicaCount"], max(1, wanted))

    assert scaled is not None
    assert keda_replicas(scaled) == keda_replicas(true_backlog) > 1
    assert wait_for_value(prometheus, "captioner:workers_up", 1) == 1
