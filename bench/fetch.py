"""What the atomic fetch costs against kombu's BRPOP: throughput, idle latency, idle load.

kombu: kombu's own Redis transport (BRPOP, then HSET/ZADD to record the message).
ours:  captioning/transport.py (one Lua script records the message, then pops it; an idle
       consumer waits FETCH_IDLE_WAIT_S between fetches that find nothing).

In-process, one kombu consumer on a private redis-server, the same transport options as
workers use (captioning/broker.py), Celery envelopes of a 16-image compact job:

- drain:  N messages already queued, consumed and acked one by one (messages/s);
- idle:   the consumer (of captions.realtime, then captions.bulk, as workers consume them)
          idles, then one message is sent to one queue; time until it is delivered (median
          and max of --probes sends per queue, each after a random idle of 0.1-1 s);
- load:   Redis commands per second an idle consumer sends (INFO commandstats over 5 s).

    .venv/bin/python -m bench.fetch [--messages 2000] [--probes 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from kombu import Connection, Consumer, Queue

from captioning.broker import celery_config, create_app
from captioning.messages import BULK_QUEUE, REALTIME_QUEUE, CaptionJob, JobItem
from captioning.settings import Settings
from tests.faults import RedisServer

TRANSPORTS = {"kombu": "redis", "ours": "captioning.transport:Transport"}


def connect(url: str, transport: str) -> Connection:
    options = celery_config(Settings(broker_url=url))["broker_transport_options"]
    return Connection(url, transport=transport, transport_options=options)


def send(url: str, count: int, queue: str = BULK_QUEUE) -> None:
    app = create_app(Settings(broker_url=url))
    job = CaptionJob(items=tuple(JobItem(uri=f"s3://photos/{n:04d}.jpg") for n in range(16)),
                     model="tiny-random-blip2", prompt="", source="backfill")
    with app.producer_or_acquire() as producer:
        for _ in range(count):
            app.send_task("captioning.caption_batch", args=[job.to_message()],
                          queue=queue, producer=producer)


def consumer(connection: Connection, on_message: Callable[[object], None]) -> Consumer:
    queues = [Queue(REALTIME_QUEUE), Queue(BULK_QUEUE)]
    made = Consumer(connection.default_channel, queues, accept=["json"],
                    callbacks=[lambda _body, message: on_message(message)])
    made.consume()
    return made


def drain(url: str, transport: str, count: int) -> float:
    send(url, count)
    done = []
    with connect(url, transport) as connection:
        consumer(connection, lambda message: (message.ack(), done.append(1)))
        start = time.perf_counter()
        while len(done) < count:
            connection.drain_events(timeout=5)
        return count / (time.perf_counter() - start)


@contextmanager
def consuming(url: str, transport: str, on_message: Callable[[object], None]) -> Iterator[None]:
    """A consumer draining in a thread, as a worker's event loop does, until the block ends."""
    stop = threading.Event()
    with connect(url, transport) as connection:
        consumer(connection, on_message)

        def loop() -> None:
            while not stop.is_set():
                with suppress(TimeoutError):
                    connection.drain_events(timeout=0.5)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def idle_latency(url: str, transport: str, probes: int, queue: str) -> list[float]:
    delivered = threading.Event()
    latencies = []
    with consuming(url, transport, lambda message: (message.ack(), delivered.set())):
        for _ in range(probes):
            time.sleep(random.uniform(0.1, 1.0))
            delivered.clear()
            sent = time.perf_counter()
            send(url, 1, queue)
            delivered.wait(10)
            latencies.append(time.perf_counter() - sent)
    return latencies


def idle_commands_per_s(server: RedisServer, transport: str, seconds: float = 5.0) -> float:
    client = server.client()
    with consuming(server.url, transport, lambda message: message.ack()):
        time.sleep(1)
        before = int(client.info("stats")["total_commands_processed"])
        time.sleep(seconds)
        after = int(client.info("stats")["total_commands_processed"])
    return (after - before - 1) / seconds  # less our own INFO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--probes", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir) / "redis").start()
        try:
            rows = {}
            for name, transport in TRANSPORTS.items():
                server.client().flushall()
                rate = drain(server.url, transport, args.messages)
                waits = [idle_latency(server.url, transport, args.probes, queue)
                         for queue in (REALTIME_QUEUE, BULK_QUEUE)]
                load = idle_commands_per_s(server, transport)
                rows[name] = (rate, *waits, load)
        finally:
            server.stop()
    print(f"{'transport':<10} {'drain msg/s':>12} {'idle→delivered, realtime':>25} "
          f"{'idle→delivered, bulk':>21} {'idle Redis cmds/s':>18}")
    for name, (rate, realtime, bulk, load) in rows.items():
        print(f"{name:<10} {rate:>12.0f} {span(realtime):>25} {span(bulk):>21} {load:>18.1f}")
    print(f"ours/kombu drain: {rows['ours'][0] / rows['kombu'][0]:.2f}x")


def span(latencies: list[float]) -> str:
    """Median (max) in milliseconds."""
    return f"{statistics.median(latencies) * 1000:.0f} ({max(latencies) * 1000:.0f}) ms"


if __name__ == "__main__":
    main()
