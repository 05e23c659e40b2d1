"""``bench worker``: raw messages per second from ``telemetry-raw`` to decisions.

N raw JSON payloads (``{"time": ms, "temperature": value}``, one reading each,
from 100 devices, one second apart per device) are produced to this run's
``telemetry-raw`` before anything consumes them. Then, in the same run:

* baseline: a bare aiokafka loop with a fresh consumer group reads the topic from
  the start and produces every value, keyed as it came, to another topic (acks
  all, no linger, as the worker's producer); timed from the first record
  consumed until the producer flushed the last one;
* worker: ``edge-otlp worker`` as a child process (exporter off, the bundled
  demo rules, its own web port and data folder) reads the same topic with its
  own group; timed from the first poll of its ``/counters`` view that shows
  ``raw_messages > 0`` to the first that shows N, so start-up is left out.

A third figure runs :meth:`streams.pipeline.Pipeline.process_raw` on the same
payloads in this process with dict stores: the pure-Python cost of the step,
without Kafka or Faust.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from connectors.kafka_topics import ensure_topics
from streams.app import pipeline_config
from streams.bench import BenchFigure
from streams.bench.live import (
    BenchRun,
    cleanup_topics,
    free_port,
    get_json,
    start_process,
    stop_process,
)
from streams.pipeline import Pipeline

logger = logging.getLogger(__name__)

BENCH = "worker"
N_DEVICES = 100
TIMEOUT_S = 300.0  # bound of the worker's drain: 50,000 took about 40 s here
POLL_S = 0.1


def _payloads(n_readings: int, seed: int) -> list[tuple[bytes, bytes]]:
    """Return (key, value) pairs: one reading per second per device, in order."""
    rng = random.Random(seed)
    per_device = math.ceil(n_readings / N_DEVICES)
    # Start far enough back that the last reading is still in the past.
    start_ms = time.time_ns() // 1_000_000 - (per_device + 60) * 1000
    pairs = []
    for i in range(n_readings):
        device, step = i % N_DEVICES, i // N_DEVICES
        value = 60 + 5 * math.sin(step / 30 + device) + rng.gauss(0, 0.5)
        if rng.random() < 0.002:
            value += 40  # a rare spike, so detectors and rules have work to do
        body = {"time": start_ms + step * 1000, "temperature": round(value, 3)}
        pairs.append((f"dev{device:03d}".encode(), orjson.dumps(body)))
    return pairs


async def _produce(
    bootstrap: str, topic: str, pairs: list[tuple[bytes, bytes]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for key, value in pairs:
            await producer.send(topic, value=value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def _copy_loop(run: BenchRun, n_readings: int) -> float:
    """Return seconds of the bare consume-and-produce loop over N records."""
    bootstrap = run.settings.kafka_bootstrap
    consumer = AIOKafkaConsumer(
        run.topic("telemetry-raw"),
        bootstrap_servers=bootstrap,
        group_id=run.prefix + "bare-copy",
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await consumer.start()
    await producer.start()
    target = run.topic("bare-copy")
    copied = 0
    started: float | None = None
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while copied < n_readings and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                for message in messages:
                    if started is None:
                        started = time.perf_counter()
                    await producer.send(target, value=message.value, key=message.key)
                    copied += 1
        await producer.flush()
        if started is None or copied < n_readings:
            raise TimeoutError(f"bare loop copied {copied} of {n_readings}")
        return time.perf_counter() - started
    finally:
        await producer.stop()
        await consumer.stop()


def _drain_worker(run: BenchRun, n_readings: int) -> tuple[float, int, dict[str, Any]]:
    """Run the worker until it processed N raw messages.

    Returns:
        Seconds between the first and the last counters poll, raw messages
        processed in that span, and the final counters.
    """
    port = free_port()
    env = run.env(EDGE_WEB_PORT=str(port), EDGE_WORKER_ID=run.id)
    process = start_process(run, "worker", ["worker"], env)
    url = f"http://127.0.0.1:{port}/counters"
    first: tuple[float, int] | None = None
    counters: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited; see {run.log_dir / 'worker.log'}")
            counters = get_json(url) or {}
            raw = int(counters.get("raw_messages", 0))
            now = time.perf_counter()
            if first is None and raw > 0:
                first = (now, raw)
            if first is not None and raw >= n_readings:
                return now - first[0], raw - first[1], counters
            time.sleep(POLL_S)
        raise TimeoutError(f"worker processed {counters.get('raw_messages')}")
    finally:
        stop_process(process)


def _process_in_process(run: BenchRun, pairs: list[tuple[bytes, bytes]]) -> float:
    """Return seconds of Pipeline.process_raw over every payload, dict stores."""
    pipeline = Pipeline(
        pipeline_config(run.settings), clock_ms=lambda: time.time_ns() // 1_000_000
    )
    store: dict[bytes, bytes] = {}
    received_ms = time.time_ns() // 1_000_000
    started = time.perf_counter()
    for offset, (key, value) in enumerate(pairs):
        pipeline.process_raw(
            device_id=key.decode(),
            payload=value,
            received_ms=received_ms,
            source="bench",
            partition=0,
            offset=offset,
            store=store,
        )
    return time.perf_counter() - started


def run(n_readings: int = 50_000, seed: int = 42, **_: Any) -> list[BenchFigure]:
    """Measure the worker's throughput against a bare consume-and-produce loop.

    Args:
        n_readings: raw messages (one reading each) pre-produced.
        seed: seed of the synthetic values.

    Returns:
        Worker raw messages per second against the bare loop, and the in-process
        rate of the pipeline step alone.
    """
    bench_run = BenchRun(BENCH)
    settings = bench_run.settings
    pairs = _payloads(n_readings, seed)
    raw_topic = bench_run.topic("telemetry-raw")
    try:
        asyncio.run(
            ensure_topics(
                settings.kafka_bootstrap,
                [raw_topic, bench_run.topic("bare-copy")],
                partitions=settings.partitions,
            )
        )
        asyncio.run(_produce(settings.kafka_bootstrap, raw_topic, pairs))
        bare_s = asyncio.run(_copy_loop(bench_run, n_readings))
        worker_s, worker_n, counters = _drain_worker(bench_run, n_readings)
    finally:
        cleanup_topics(bench_run)
    step_s = _process_in_process(bench_run, pairs)

    bare_rate = n_readings / bare_s
    worker_rate = worker_n / worker_s
    step_rate = n_readings / step_s
    ratio = worker_rate / bare_rate
    produced = ", ".join(
        f"{counters.get(k, 0):,} {k}" for k in ("summaries", "anomalies", "decisions")
    )
    return [
        BenchFigure(
            bench=BENCH,
            name="raw to summaries, scores, decisions",
            value=worker_rate,
            unit="messages/s",
            baseline=bare_rate,
            baseline_name="bare aiokafka consume-and-produce loop",
            ratio=ratio,
            target=">= 0.5",
            met=ratio >= 0.5,
            note=f"{n_readings:,} raw messages, {N_DEVICES} devices, readings"
            f" published; worker produced {produced}",
        ),
        BenchFigure(
            bench=BENCH,
            name="Pipeline.process_raw alone, in-process",
            value=step_rate,
            unit="messages/s",
            baseline=worker_rate,
            baseline_name="the worker, same run",
            ratio=step_rate / worker_rate,
            note=f"pure-Python step share of the worker's time:"
            f" {worker_rate / step_rate:.0%}",
        ),
    ]
