"""Metrics and health around the worker, as Celery signal hooks, so tasks stay business logic.

The prefork pool runs the model in child processes, so metrics use prometheus-client's
multiprocess mode: every process writes to PROMETHEUS_MULTIPROC_DIR and the parent serves
the merged view on CAPTIONER_METRICS_PORT. The directory must be set before
prometheus_client is first imported, and wiped at start so a restart does not resurrect
the counters of dead processes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir() -> Path:
    """Create (or empty) the shared metrics directory; call before importing prometheus_client."""
    directory = Path(os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="captioner-prom-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def serve_metrics(port: int) -> None:
    """Serve the merged metrics of every worker process (parent only)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, registry=registry)


def mark_process_dead(pid: int) -> None:
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
