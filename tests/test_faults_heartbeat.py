"""Heartbeats: a vanished worker's job runs again within 60 s, a stalled one keeps its job.

Unlike tests/test_faults_worker.py these run with the default job limits, so the visibility
timeout (about 20 minutes) cannot be what brings a job back: only the heartbeat reaper can.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from captioning.broker import create_app
from captioning.connections import redis_client
from captioning.heartbeats import Heartbeat
from captioning.keys import HEARTBEATS_KEY, UNACKED_INDEX_KEY, done_key, held_key
from captioning.results import ResultsStore
from captioning.settings import Settings
from tests.conftest import settings_env
from tests.faults import RedisServer, Rig, Worker, one_row_each, put, wait_until
from tests.imagefactory import photo_bytes

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def rig(
    settings: Settings, broker: RedisServer, results: ResultsStore, tmp_path: Path
) -> Iterator[Rig]:
    defaults = settings.model_copy(update={"broker_url": broker.url})
    rig = Rig(defaults, broker, results, settings_env(defaults), tmp_path, create_app(defaults))
    yield rig
    for worker in rig.workers:
        worker.kill_all()


def holder(rig: Rig) -> Worker:
    """The started worker whose heartbeat entry holds a reserved job."""
    client = rig.client

    def find() -> Worker | None:
        for member in client.zrange(HEARTBEATS_KEY, 0, -1):
            worker_id = member.decode()
            if client.scard(held_key(worker_id)):
                pid = int(worker_id.split(":")[1])
                return next(w for w in rig.workers if w.pid == pid)
        return None

    return wait_until(find, 30, "the worker holding the job", every=0.05)


def images(s3, prefix: str, count: int) -> list[str]:
    photos = list(photo_bytes().values())
    return put(s3, prefix, {f"{n:02d}.img": photos[n % len(photos)] for n in range(count)})


def test_defaults_leave_the_visibility_timeout_far_above_the_heartbeat() -> None:
    defaults = Settings()
    assert defaults.heartbeat_ttl_s < 60 < defaults.visibility_timeout_s


def test_the_job_of_a_killed_worker_is_written_by_another_within_60_s(
    s3, rig: Rig, prefix: str
) -> None:
    uris = images(s3, prefix, 32)
    rig.start_worker()
    rig.start_worker()
    job_id = f"vanish-{uuid.uuid4().hex}"
    rig.send(uris, job_id)
    rig.started(job_id)
    victim = holder(rig)
    survivor = next(w for w in rig.workers if w is not victim)
    victim_pool = {str(pid) for pid in victim.pool_pids()}

    killed_at = time.monotonic()
    os.killpg(victim.pid, signal.SIGKILL)  # the spot VM is gone: main process and pool
    victim.process.wait(timeout=30)
    assert rig.client.hlen("unacked") == 1

    rows = one_row_each(rig.results, uris, timeout=60)
    elapsed = time.monotonic() - killed_at
    assert elapsed < 60, elapsed
    assert [r.status for r in rows.values()] == ["ok"] * 32
    assert not {r.worker.rsplit(":", 1)[1] for r in rows.values()} & victim_pool
    assert "job(s) they held go back to their queues" in survivor.log()
    wait_until(lambda: rig.client.hlen("unacked") == 0, 30, "the redelivered job's ack")


def test_a_worker_stalled_for_less_than_the_heartbeat_ttl_keeps_its_job(
    s3, rig: Rig, prefix: str
) -> None:
    rig.start_worker()
    rig.start_worker()
    warmup = images(s3, prefix + "warm/", 4)
    started = time.monotonic()
    rig.send(warmup, f"warm-{uuid.uuid4().hex}")
    one_row_each(rig.results, warmup, timeout=60)
    one_job_s = time.monotonic() - started

    uris = images(s3, prefix, 4)
    job_id = f"stall-{uuid.uuid4().hex}"
    rig.send(uris, job_id)
    rig.started(job_id)
    stalled = holder(rig)
    stall_s = rig.settings.heartbeat_ttl_s / 2
    assert one_job_s < stall_s, f"one job took {one_job_s:.1f} s; the stall must be longer"
    os.killpg(stalled.pid, signal.SIGSTOP)  # a long GC pause, a frozen VM
    time.sleep(stall_s)
    os.killpg(stalled.pid, signal.SIGCONT)

    rows = one_row_each(rig.results, uris, timeout=60)
    client = rig.client
    wait_until(lambda: client.exists(done_key(job_id)) and client.hlen("unacked") == 0,
               30, "the job's ack")
    time.sleep(rig.settings.heartbeat_ttl_s / 2)  # room for a wrong second run to show
    rows = one_row_each(rig.results, uris, timeout=1)
    assert all(r.status == "ok" and r.attempts == 1 for r in rows.values()), rows
    assert {r.worker.rsplit(":", 1)[1] for r in rows.values()} <= {
        str(pid) for pid in stalled.pool_pids()}
    assert all("go back to their queues" not in w.log() for w in rig.workers)
    assert client.zcard(HEARTBEATS_KEY) == 2


def test_the_reaper_claims_a_dead_worker_s_jobs_once_and_spares_live_ones(
    broker: RedisServer,
) -> None:
    client = broker.client()
    now = int(client.time()[0])
    client.zadd(HEARTBEATS_KEY, {"dead-host:1:a": now - 60, "live-host:2:b": now - 2})
    client.sadd(held_key("dead-host:1:a"), "tag-dead", "tag-acked")
    client.sadd(held_key("live-host:2:b"), "tag-live")
    client.zadd(UNACKED_INDEX_KEY, {"tag-dead": now - 30, "tag-live": now - 30})
    reaper = Heartbeat(redis_client(broker.url), ttl_s=20, held_ttl_s=3600)

    first = reaper.reap()
    second = reaper.reap()

    assert (first.workers, first.jobs) == (1, 1)  # tag-acked is no longer in unacked_index
    assert (second.workers, second.jobs) == (0, 0)
    assert client.zscore(UNACKED_INDEX_KEY, "tag-dead") == 0  # visible to kombu's sweep now
    assert client.zscore(UNACKED_INDEX_KEY, "tag-live") == now - 30
    assert client.zscore(UNACKED_INDEX_KEY, "tag-acked") is None
    assert not client.exists(held_key("dead-host:1:a"))
    assert client.smembers(held_key("live-host:2:b")) == {b"tag-live"}
    assert [m.decode() for m in client.zrange(HEARTBEATS_KEY, 0, -1)] == ["live-host:2:b"]


def test_a_worker_cut_off_past_the_ttl_loses_its_job_and_finishing_it_keeps_one_row(
    s3, rig: Rig, prefix: str
) -> None:
    rig.start_worker()
    rig.start_worker()
    uris = images(s3, prefix, 8)
    job_id = f"cut-{uuid.uuid4().hex}"
    rig.send(uris, job_id)
    rig.started(job_id)
    cut_off = holder(rig)
    other = next(w for w in rig.workers if w is not cut_off)
    os.killpg(cut_off.pid, signal.SIGSTOP)  # partitioned (or frozen) past the heartbeat TTL
    try:
        rows = one_row_each(rig.results, uris, timeout=rig.settings.heartbeat_ttl_s + 60)
        assert all(r.attempts == 1 for r in rows.values())  # written by the other worker
    finally:
        os.killpg(cut_off.pid, signal.SIGCONT)
    assert "go back to their queues" in other.log()

    def written_twice() -> bool:
        found = one_row_each(rig.results, uris, timeout=1)
        return all(r.attempts == 2 for r in found.values())

    wait_until(written_twice, 60, "the cut-off worker to finish its copy")
    client = rig.client
    wait_until(lambda: client.hlen("unacked") == 0, 30, "both deliveries acked")
    assert len(one_row_each(rig.results, uris, timeout=1)) == 8
