"""Fault injection, workers: kill -9 (pool process and whole worker), poison jobs, SIGTERM.

Each test runs its own workers on a private Redis, so killing them never disturbs the
session's worker. Timings use short limits: a 10 s job deadline makes the visibility timeout
(10 + 2) x 1.25 = 15 s, so a job of a vanished worker comes back within ~20 s.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from captioning.broker import create_app
from captioning.keys import UNACKED_KEY, deliveries_key
from captioning.messages import BULK_QUEUE
from captioning.results import ResultsStore
from captioning.settings import Settings
from tests.conftest import settings_env
from tests.faults import (
    RedisServer,
    Rig,
    one_row_each,
    put,
    slow_png,
    wait_until,
    worker_env,
)
from tests.imagefactory import photo_bytes

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def fault_settings(settings: Settings, broker: RedisServer) -> Settings:
    return settings.model_copy(update={
        "broker_url": broker.url, "job_time_limit_s": 10, "retry_backoff_max_s": 2,
        "max_deliveries": 2, "max_image_pixels": 40_000_000,
    })


@pytest.fixture
def env(fault_settings: Settings) -> dict[str, str]:
    s = fault_settings
    return worker_env(settings_env(s), job_time_limit_s=s.job_time_limit_s,
                      retry_backoff_max_s=s.retry_backoff_max_s,
                      max_deliveries=s.max_deliveries)


@pytest.fixture
def rig(
    fault_settings: Settings, broker: RedisServer, results: ResultsStore,
    env: dict[str, str], tmp_path: Path,
) -> Iterator[Rig]:
    rig = Rig(fault_settings, broker, results, env, tmp_path, create_app(fault_settings))
    yield rig
    for worker in rig.workers:
        worker.kill_all()


def test_a_job_that_kills_its_worker_is_isolated_and_the_queue_flows(
    s3, rig: Rig, prefix: str
) -> None:
    photos = photo_bytes()
    poison, neighbour = put(s3, prefix, {"poison.png": slow_png(), "n.png": photos["coffee.png"]})
    later = put(s3, prefix, {"l1.jpg": photos["rocket.jpg"], "l2.png": photos["chelsea.png"]})
    worker = rig.start_worker()
    job_id = f"poison-{uuid.uuid4().hex}"
    rig.send([poison, neighbour], job_id)
    rig.send(later, f"later-{uuid.uuid4().hex}")

    # Play the OOM killer: whenever the poison image's job starts, SIGKILL the pool process.
    client = rig.client
    kills: list[tuple[str, int]] = []
    poisoned = (job_id, f"{job_id}.0")  # the whole job, then its one-image part for poison
    while len(kills) < 2 * rig.settings.max_deliveries:
        wait_until(lambda: _new_delivery(client, poisoned, kills, rig.settings.max_deliveries),
                   90, "the next delivery", every=0.01)
        assert worker.kill_pool() == 1

    rows = one_row_each(rig.results, [poison, neighbour, *later], timeout=90)
    assert rows[poison].status == "failed"
    assert rows[poison].error.startswith("WorkerLost: the job was delivered 2 times")
    assert all(rows[u].status == "ok" for u in (neighbour, *later)), rows
    assert all(r.attempts == 1 for r in rows.values())
    assert kills == [(job_id, 1), (job_id, 2), (f"{job_id}.0", 1), (f"{job_id}.0", 2)]
    assert "split into 2 one-image jobs" in worker.log()


def _new_delivery(
    client: redis.Redis, ids: tuple[str, ...], seen: list[tuple[str, int]], most: int
) -> bool:
    """True once a delivery that may still run (count <= `most`) starts for one of `ids`."""
    for task_id in ids:
        count = client.get(deliveries_key(task_id))
        if count is not None and int(count) <= most and (task_id, int(count)) not in seen:
            seen.append((task_id, int(count)))
            return True
    return False


def test_a_vanished_worker_s_job_is_delivered_to_another_worker(
    s3, rig: Rig, prefix: str
) -> None:
    uris = put(s3, prefix, {"slow.png": slow_png(), "a.jpg": photo_bytes()["rocket.jpg"]})
    first = rig.start_worker()
    job_id = f"vanish-{uuid.uuid4().hex}"
    rig.send(uris, job_id)
    client = rig.client
    rig.started(job_id)

    first.kill_all()  # the spot VM is gone: main process and pool, no chance to requeue
    assert client.hlen(UNACKED_KEY) == 1
    rig.start_worker()

    rows = one_row_each(rig.results, uris, timeout=60 + rig.settings.visibility_timeout_s)
    assert [r.status for r in rows.values()] == ["ok", "ok"]
    assert all(r.attempts == 1 for r in rows.values())
    # Rows are written before the ack: give the ack its moment.
    wait_until(lambda: client.hlen(UNACKED_KEY) == 0, 30, "the redelivered job's ack")


def test_sigterm_finishes_the_job_in_hand_and_leaves_the_rest_queued(
    s3, rig: Rig, prefix: str
) -> None:
    slow = slow_png()
    in_hand = put(s3, prefix, {f"slow{i}.png": slow for i in range(4)})
    waiting = put(s3, prefix, {"next.jpg": photo_bytes()["rocket.jpg"]})
    worker = rig.start_worker()
    job_id = f"term-{uuid.uuid4().hex}"
    rig.send(in_hand, job_id)
    rig.send(waiting, f"waiting-{uuid.uuid4().hex}")
    client = rig.client
    rig.started(job_id)

    assert worker.stop(timeout=60) == 0  # SIGTERM: warm shutdown

    rows = one_row_each(rig.results, in_hand, timeout=1)
    assert all(r.status == "ok" and r.attempts == 1 for r in rows.values())
    assert rig.results.rows(prefix=waiting[0]) == []
    assert client.llen(BULK_QUEUE) == 1 and client.hlen(UNACKED_KEY) == 0

    rig.start_worker()
    assert one_row_each(rig.results, waiting, timeout=60)[waiting[0]].status == "ok"
    assert all(r.attempts == 1 for r in one_row_each(rig.results, in_hand, timeout=1).values())
