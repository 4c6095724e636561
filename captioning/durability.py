"""Can this Redis lose queued jobs? Eviction and persistence, read once and named.

A Redis with a `maxmemory-policy` other than `noeviction` drops keys (queued jobs among
them) silently when it fills up; one with neither AOF nor RDB snapshots loses everything on
a restart. Workers and `captioner status` warn about either; the exporter publishes both as
metrics, and an alert fires on them (deploy/prometheus/rules.yml).

INFO answers on managed Redis (ElastiCache, Memorystore) where CONFIG is often disabled;
only the RDB save schedule needs CONFIG, and is reported unknown without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

SAFE_POLICY = "noeviction"


@dataclass(frozen=True)
class BrokerDurability:
    #: `maxmemory-policy`; None when Redis would not say.
    eviction_policy: str | None
    aof: bool | None
    #: Whether RDB snapshots are scheduled (`save` is not empty); None when CONFIG is refused.
    rdb_snapshots: bool | None

    @property
    def evicts(self) -> bool | None:
        return None if self.eviction_policy is None else self.eviction_policy != SAFE_POLICY

    @property
    def persists(self) -> bool | None:
        if self.aof or self.rdb_snapshots:
            return True
        if self.aof is None or self.rdb_snapshots is None:
            return None
        return False

    def warnings(self) -> list[str]:
        found = []
        if self.evicts:
            found.append(
                f"Redis evicts keys when full (maxmemory-policy {self.eviction_policy}), "
                "so queued jobs can vanish: set maxmemory-policy noeviction"
            )
        if self.persists is False:
            found.append(
                "Redis keeps nothing on disk (no AOF, no RDB snapshots), so a restart loses "
                "every queued job: set appendonly yes and appendfsync everysec"
            )
        return found


def read_durability(client: redis.Redis) -> BrokerDurability:
    """Raises redis.RedisError only when Redis does not answer INFO."""
    memory = client.info("memory")
    persistence = client.info("persistence")
    policy = memory.get("maxmemory_policy")
    aof = persistence.get("aof_enabled")
    try:
        save = client.config_get("save").get("save")
    except redis.ResponseError:  # CONFIG renamed or disabled (managed Redis)
        save = None
    return BrokerDurability(
        eviction_policy=str(policy) if policy is not None else None,
        aof=bool(int(aof)) if aof is not None else None,
        rdb_snapshots=bool(str(save).strip()) if save is not None else None,
    )
