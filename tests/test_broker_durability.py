"""A Redis that can lose queued jobs is named: by `captioner status`, the exporter, workers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from captioning.durability import BrokerDurability, read_durability
from captioning.exporter import durability_families
from captioning.settings import Settings
from tests.conftest import settings_env
from tests.faults import RedisServer


@pytest.mark.parametrize(
    ("durability", "evicts", "persists", "warnings"),
    [
        (BrokerDurability("noeviction", aof=True, rdb_snapshots=False), False, True, 0),
        (BrokerDurability("noeviction", aof=False, rdb_snapshots=True), False, True, 0),
        (BrokerDurability("allkeys-lru", aof=True, rdb_snapshots=True), True, True, 1),
        (BrokerDurability("volatile-lru", aof=False, rdb_snapshots=False), True, False, 2),
        (BrokerDurability("noeviction", aof=False, rdb_snapshots=None), False, None, 0),
        (BrokerDurability(None, aof=None, rdb_snapshots=None), None, None, 0),
    ],
)
def test_what_can_lose_jobs(
    durability: BrokerDurability, evicts: bool | None, persists: bool | None, warnings: int
) -> None:
    assert (durability.evicts, durability.persists) == (evicts, persists)
    assert len(durability.warnings()) == warnings


def status_json(settings: Settings, broker: RedisServer) -> dict[str, object]:
    env = {**settings_env(settings), "CAPTIONER_BROKER_URL": broker.url}
    done = subprocess.run([sys.executable, "-m", "cli", "status", "--json"], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


@pytest.mark.usefixtures("results")  # the captions table `status` reads
def test_status_and_exporter_name_a_redis_that_evicts_and_keeps_nothing(
    settings: Settings, broker: RedisServer
) -> None:
    client = broker.client()
    client.config_set("maxmemory-policy", "allkeys-lru")

    durability = read_durability(client)
    assert (durability.eviction_policy, durability.aof, durability.rdb_snapshots) == (
        "allkeys-lru", False, False)
    warnings = status_json(settings, broker)["broker_warnings"]
    assert [w.split(",")[0].split(" (")[0] for w in warnings] == [
        "Redis evicts keys when full", "Redis keeps nothing on disk"]
    metrics = {f.name: f.samples[0].value for f in durability_families(client)}
    assert metrics == {"captioner_broker_evicts": 1, "captioner_broker_persists": 0}

    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("appendonly", "yes")
    client.config_set("appendfsync", "everysec")
    assert status_json(settings, broker)["broker_warnings"] == []
    metrics = {f.name: f.samples[0].value for f in durability_families(client)}
    assert metrics == {"captioner_broker_evicts": 0, "captioner_broker_persists": 1}
