"""`captioner exporter`: the queue side of the autoscaling signal, read fresh at every scrape.

Workers cannot report work that no worker has picked up yet, and a scaled-to-zero fleet has
no workers at all, so one small exporter reads Redis and publishes waiting and in-flight
work. No label ever holds a URI or id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from captioning.connections import redis_client
from captioning.deadletters import DeadLetters
from captioning.durability import read_durability
from captioning.messages import WAITING_QUEUES
from captioning.queues import inflight_stats, queue_stats_for

log = logging.getLogger(__name__)


class QueueCollector(Collector):
    def __init__(self, broker_url: str) -> None:
        # No retries: a scrape has its own deadline, and the next one comes soon.
        self._client = redis_client(broker_url, retries=0, timeout_s=5)
        self._dead = DeadLetters(self._client)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("captioner_exporter_broker_up", "1 if Redis answered this scrape.")
        try:
            families = list(self._families())
        except redis.RedisError as exc:
            log.warning("cannot read the broker: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[GaugeMetricFamily]:
        messages = GaugeMetricFamily(
            "captioner_queue_messages", "Jobs waiting in each queue.", labels=["queue"]
        )
        images = GaugeMetricFamily(
            "captioner_queue_images", "Images in the jobs waiting in each queue.", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "captioner_queue_oldest_age_seconds",
            "Age of the oldest waiting job in each queue.",
            labels=["queue"],
        )
        for queue in WAITING_QUEUES:
            stats = queue_stats_for(self._client, queue)
            messages.add_metric([queue], stats.jobs)
            images.add_metric([queue], stats.images)
            oldest.add_metric([queue], stats.oldest_age_s)
        inflight = inflight_stats(self._client)
        yield messages
        yield images
        yield oldest
        yield GaugeMetricFamily(
            "captioner_inflight_messages", "Jobs reserved by workers, not yet acked.",
            value=inflight.jobs,
        )
        yield GaugeMetricFamily(
            "captioner_inflight_images", "Images in jobs reserved by workers, not yet acked.",
            value=inflight.images,
        )
        yield GaugeMetricFamily(
            "captioner_dead_letter_messages", "Jobs in captions.dead.", value=len(self._dead)
        )
        yield from durability_families(self._client)


def durability_families(client: redis.Redis) -> Iterator[GaugeMetricFamily]:
    """Whether Redis can lose queued jobs; a series is left out when Redis will not say."""
    durability = read_durability(client)
    if durability.evicts is not None:
        yield GaugeMetricFamily(
            "captioner_broker_evicts",
            "1 if Redis evicts keys when full (maxmemory-policy is not noeviction).",
            value=int(durability.evicts),
        )
    if durability.persists is not None:
        yield GaugeMetricFamily(
            "captioner_broker_persists",
            "1 if Redis writes its data to disk (AOF or RDB snapshots).",
            value=int(durability.persists),
        )


def serve(broker_url: str, port: int) -> None:
    registry = CollectorRegistry()
    registry.register(QueueCollector(broker_url))
    start_http_server(port, addr="0.0.0.0", registry=registry)
