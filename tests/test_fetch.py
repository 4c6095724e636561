"""The atomic fetch: a job leaves its queue only once it is recorded as held by its worker.

Real redis-server processes (a private one per test), real Celery envelopes, and kombu
connections through captioning's transport.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Consumer, Queue

from captioning.broker import create_app
from captioning.fetch import fetch_args, fetch_script, parse_fetched
from captioning.heartbeats import Heartbeat
from captioning.keys import HEARTBEATS_KEY, UNACKED_INDEX_KEY, UNACKED_KEY, held_key
from captioning.settings import Settings
from tests.faults import RedisServer, wait_until

pytestmark = pytest.mark.timeout(120)

QUEUE = "captions.bulk"


@pytest.fixture
def app_settings(settings: Settings, broker: RedisServer) -> Settings:
    return settings.model_copy(update={"broker_url": broker.url})


def send(settings: Settings, body: str, queue: str = QUEUE) -> str:
    """A real Celery envelope on `queue`; returns its delivery tag."""
    create_app(settings).send_task("captioner.probe", args=[body], queue=queue)
    client = redis.Redis.from_url(settings.broker_url)
    return json.loads(client.lindex(queue, 0))["properties"]["delivery_tag"]


def evaluate(client: redis.Redis, keys: list[str], worker: str = "host:1:abc") -> object:
    version = client.info("server")["redis_version"]
    return client.execute_command("EVAL", fetch_script(version), *fetch_args(
        keys, unacked_key=UNACKED_KEY, unacked_index_key=UNACKED_INDEX_KEY,
        held_key=held_key(worker), worker=worker, held_ttl_s=600, now=1234.5,
    ))


def test_the_script_records_the_job_as_kombu_does_before_popping_it(
    app_settings: Settings, broker: RedisServer
) -> None:
    client = broker.client()
    tag = send(app_settings, "a")
    raw = client.lindex(QUEUE, -1)

    fetched = parse_fetched(evaluate(client, ["captions.realtime", QUEUE]))

    assert fetched is not None and fetched.recorded
    assert (fetched.queue_key, fetched.raw) == (QUEUE, raw)
    assert client.llen(QUEUE) == 0
    message, exchange, routing_key = json.loads(client.hget(UNACKED_KEY, tag))
    assert message == json.loads(raw)  # what kombu's QoS.append writes: [raw, EX, RK]
    assert (exchange, routing_key) == (message["properties"]["delivery_info"]["exchange"], QUEUE)
    assert client.zscore(UNACKED_INDEX_KEY, tag) == 1234.5
    assert client.smembers(held_key("host:1:abc")) == {tag.encode()}
    assert 0 < client.ttl(held_key("host:1:abc")) <= 600
    assert client.zscore(HEARTBEATS_KEY, "host:1:abc") is not None  # alive before any beat


def test_the_script_takes_the_first_queue_in_order_and_nothing_from_empty_ones(
    app_settings: Settings, broker: RedisServer
) -> None:
    client = broker.client()
    assert parse_fetched(evaluate(client, ["captions.realtime", QUEUE])) is None
    send(app_settings, "bulk")
    send(app_settings, "urgent", queue="captions.realtime")

    first = parse_fetched(evaluate(client, ["captions.realtime", QUEUE]))
    second = parse_fetched(evaluate(client, ["captions.realtime", QUEUE]))

    assert first is not None and first.queue_key == "captions.realtime"
    assert second is not None and second.queue_key == QUEUE
    assert client.hlen(UNACKED_KEY) == 2


def test_junk_is_popped_and_held_by_nobody(broker: RedisServer) -> None:
    client = broker.client()
    client.lpush(QUEUE, b"not json", b'{"properties": {}}')

    fetched = [parse_fetched(evaluate(client, [QUEUE])) for _ in range(2)]

    assert [(f.raw, f.recorded) for f in fetched if f] == [
        (b"not json", False), (b'{"properties": {}}', False)]
    assert client.hlen(UNACKED_KEY) == 0
    assert not client.exists(held_key("host:1:abc"))


def test_a_full_redis_refuses_the_fetch_before_popping_or_lets_it_drain(
    app_settings: Settings, broker: RedisServer
) -> None:
    """At maxmemory with noeviction: the Redis 6 form of the script stops at its first
    write, with the job still queued; the Redis 7 form (allow-oom) fetches it."""
    client = broker.client()
    tag = send(app_settings, "a")
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    try:
        keys = fetch_args([QUEUE], unacked_key=UNACKED_KEY, unacked_index_key=UNACKED_INDEX_KEY,
                          held_key=held_key("w"), worker="w", held_ttl_s=60, now=1.0)
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            client.execute_command("EVAL", fetch_script("6.2.0"), *keys)
        assert client.llen(QUEUE) == 1 and client.hlen(UNACKED_KEY) == 0
        assert parse_fetched(client.execute_command("EVAL", fetch_script("7.0.0"), *keys))
    finally:
        client.config_set("maxmemory", 0)
    assert client.llen(QUEUE) == 0 and client.hexists(UNACKED_KEY, tag)


@pytest.fixture
def connection(app_settings: Settings) -> Iterator[Connection]:
    with create_app(app_settings).connection_for_read() as conn:
        yield conn


def consume(connection: Connection, received: list) -> Consumer:
    consumer = Consumer(connection.default_channel, [Queue(QUEUE)], accept=["json"],
                        callbacks=[lambda _body, message: received.append(message)])
    consumer.consume()
    return consumer


def test_a_consumer_gets_acks_and_waits_between_fetches(
    app_settings: Settings, broker: RedisServer, connection: Connection
) -> None:
    client = broker.client()
    received: list = []
    consume(connection, received)
    with pytest.raises(TimeoutError):
        connection.drain_events(timeout=0.5)  # idle: the next fetch waits on the idle key
    tag = send(app_settings, "a")
    connection.drain_events(timeout=5)

    (message,) = received
    assert message.delivery_tag == tag
    assert client.hexists(UNACKED_KEY, tag) and client.llen(QUEUE) == 0
    message.ack()
    assert client.hlen(UNACKED_KEY) == 0 and client.zcard(UNACKED_INDEX_KEY) == 0
    assert not any(client.smembers(key) for key in client.keys(held_key("*")))


def test_an_idle_consumer_of_a_full_redis_still_takes_jobs(
    app_settings: Settings, broker: RedisServer, connection: Connection
) -> None:
    """The wait for the first queue (LMOVE) is refused at maxmemory; the fetch (allow-oom on
    Redis 7) is not, and the next wait is one that a full Redis accepts."""
    client = broker.client()
    if int(client.info("server")["redis_version"].split(".")[0]) < 7:
        pytest.skip("Redis 6 refuses the fetch itself at maxmemory (tested above)")
    received: list = []
    consume(connection, received)
    with pytest.raises(TimeoutError):
        connection.drain_events(timeout=0.3)  # idle: a wait and a fetch are in flight
    time.sleep(0.7)  # both answered (nothing); the replies wait in the socket
    tag = send(app_settings, "a")
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    try:
        connection.drain_events(timeout=5)
    finally:
        client.config_set("maxmemory", 0)

    assert [message.delivery_tag for message in received] == [tag]
    assert connection.default_channel._queue_wait_refused


def test_a_requeued_job_goes_to_the_front_of_its_queue(
    app_settings: Settings, broker: RedisServer, connection: Connection
) -> None:
    client = broker.client()
    received: list = []
    consume(connection, received)
    first = send(app_settings, "first")
    connection.drain_events(timeout=5)
    later = send(app_settings, "later")

    received[0].reject(requeue=True)  # as Celery does when the job's pool process died

    assert [json.loads(raw)["properties"]["delivery_tag"]
            for raw in client.lrange(QUEUE, 0, -1)] == [later, first]  # BRPOP end is right
    assert not client.hexists(UNACKED_KEY, first)


FETCH_AND_DIE = """
import os, signal, sys, time
from kombu import Consumer, Queue
from captioning.broker import create_app
from captioning.settings import Settings
conn = create_app(Settings(broker_url=sys.argv[1])).connection_for_read()
Consumer(conn.default_channel, [Queue("captions.bulk")], accept=["json"]).consume()
conn.transport.cycle.on_poll_start()  # the fetch is sent; its reply is never read
time.sleep(1)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_worker_killed_before_reading_its_fetch_loses_nothing(
    app_settings: Settings, broker: RedisServer
) -> None:
    """kombu's BRPOP here would leave the job only in the dead process's socket."""
    client = broker.client()
    tag = send(app_settings, "a")
    died = subprocess.run([sys.executable, "-c", FETCH_AND_DIE, broker.url], check=False,
                          env={**os.environ, "CAPTIONER_LOG_LEVEL": "WARNING"})
    assert died.returncode == -signal.SIGKILL
    assert client.llen(QUEUE) == 0  # it was taken ...
    (worker,) = [m.decode() for m in client.zrange(HEARTBEATS_KEY, 0, -1)]
    assert client.smembers(held_key(worker)) == {tag.encode()}  # ... and is held by the dead

    time.sleep(1.1)
    reaped = Heartbeat(client, ttl_s=1, held_ttl_s=60).reap()
    assert (reaped.workers, reaped.jobs) == (1, 1)
    with create_app(app_settings).connection_for_read() as conn:
        wait_until(lambda: conn.default_channel.qos.restore_visible(num=10, interval=1)
                   or client.llen(QUEUE), 10, "kombu's sweep to restore the job")
    assert json.loads(client.lindex(QUEUE, -1))["properties"]["delivery_tag"] == tag


def test_leaving_releases_a_fetched_job_whose_reply_was_never_read(
    broker: RedisServer,
) -> None:
    client = broker.client()
    heartbeat = Heartbeat(client, ttl_s=20, held_ttl_s=60)
    heartbeat.beat()
    client.sadd(held_key(heartbeat.id), "unread", "acked")
    client.zadd(UNACKED_INDEX_KEY, {"unread": 1000.0})

    left = heartbeat.stop()

    assert left.jobs == 1
    assert client.zscore(UNACKED_INDEX_KEY, "unread") == 0  # the next sweep restores it
    assert client.zscore(UNACKED_INDEX_KEY, "acked") is None
    assert not client.exists(held_key(heartbeat.id))
    assert client.zscore(HEARTBEATS_KEY, heartbeat.id) is None
