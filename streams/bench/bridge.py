"""``bench bridge``: MQTT messages per second through the bridge into Kafka.

Both sides drain the same backlog: N QoS 1 messages that Mosquitto queued for an
offline persistent session. Before each measurement a plain client connects under
the measured client id (clean start off, session kept 300 s), subscribes and
leaves; then one publisher sends the N messages and waits for every PUBACK. The
clock starts when the measured client connects, so the publisher's cost stays out
of the window, and stops:

* baseline: when a bare paho subscriber (QoS 1, paho acknowledges on receipt,
  callback does nothing else) has received all N;
* bridge: when :class:`connectors.mqtt.Bridge`, in this process, has acknowledged
  all N over MQTT, each only after Kafka acknowledged its record
  (``counters.acknowledged == N``). Its window includes the Kafka producer's
  start-up, a few tens of milliseconds.

Baseline and bridge alternate ``repeats`` times; the fastest of each counts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from connectors.kafka_topics import ensure_topics
from connectors.mqtt import Bridge
from streams.bench import BenchFigure
from streams.bench.live import BenchRun, cleanup_topics

logger = logging.getLogger(__name__)

BENCH = "bridge"
SESSION_EXPIRY_S = 300  # long enough for one run; the broker forgets it after
PUBLISH_INFLIGHT = 500
N_DEVICES = 100
TIMEOUT_S = 180.0  # bound of every wait: the slowest drain seen took about 20 s


def _payloads(n_messages: int, payload_bytes: int) -> list[bytes]:
    base_ms = time.time_ns() // 1_000_000
    payloads = []
    for seq in range(n_messages):
        body = {"time": base_ms + seq, "temperature": 20.0 + seq % 50 / 10, "pad": ""}
        size = len(orjson.dumps(body))
        body["pad"] = "x" * max(0, payload_bytes - size)
        payloads.append(orjson.dumps(body))
    return payloads


def _client(client_id: str) -> mqtt.Client:
    return mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )


def _connect_properties(expiry_s: int) -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = expiry_s
    return properties


def _open_session(run: BenchRun, client_id: str, subscription: str) -> None:
    """Leave a persistent session with one QoS 1 subscription, then go offline."""
    client = _client(client_id)
    subscribed = threading.Event()
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect(
        run.settings.mqtt_host,
        run.settings.mqtt_port_from_url,
        clean_start=False,
        properties=_connect_properties(SESSION_EXPIRY_S),
    )
    client.loop_start()
    client.subscribe(subscription, qos=1)
    if not subscribed.wait(10.0):
        raise TimeoutError(f"no SUBACK for {subscription} within 10 s")
    client.disconnect()
    client.loop_stop()


def _close_session(run: BenchRun, client_id: str) -> None:
    """Make the broker forget the session of ``client_id`` and its queue."""
    client = _client(client_id)
    client.connect(
        run.settings.mqtt_host,
        run.settings.mqtt_port_from_url,
        clean_start=True,
        properties=_connect_properties(0),
    )
    client.loop(timeout=0.5)
    client.disconnect()


def _publish(run: BenchRun, payloads: list[bytes]) -> None:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=run.client_id("publisher"),
        protocol=mqtt.MQTTv311,
    )
    client.max_inflight_messages_set(PUBLISH_INFLIGHT)
    client.max_queued_messages_set(0)
    done = threading.Semaphore(0)
    client.on_publish = lambda *args: done.release()
    client.connect(run.settings.mqtt_host, run.settings.mqtt_port_from_url)
    client.loop_start()
    topics = [run.mqtt_topic(f"dev{i:03d}") for i in range(N_DEVICES)]
    for seq, payload in enumerate(payloads):
        client.publish(topics[seq % N_DEVICES], payload, qos=1)
    deadline = time.monotonic() + TIMEOUT_S
    for _ in payloads:
        if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("publisher: not every PUBACK arrived")
    client.disconnect()
    client.loop_stop()


def _drain_bare(run: BenchRun, client_id: str, n_messages: int) -> float:
    """Return seconds from connect until a bare subscriber received every message."""
    client = _client(client_id)
    received = 0
    finished = threading.Event()

    def on_message(*args: Any) -> None:
        nonlocal received
        received += 1
        if received >= n_messages:
            finished.set()

    client.on_message = on_message
    started = time.perf_counter()
    client.connect(
        run.settings.mqtt_host,
        run.settings.mqtt_port_from_url,
        clean_start=False,
        properties=_connect_properties(SESSION_EXPIRY_S),
    )
    client.loop_start()
    if not finished.wait(TIMEOUT_S):
        raise TimeoutError(f"bare subscriber got {received} of {n_messages}")
    elapsed_s = time.perf_counter() - started
    client.disconnect()
    client.loop_stop()
    return elapsed_s


async def _drain_bridge(run: BenchRun, client_id: str, n_messages: int) -> float:
    """Return seconds from start until the bridge acknowledged every message."""
    settings = run.settings
    bridge = Bridge(
        mqtt_host=settings.mqtt_host,
        mqtt_port=settings.mqtt_port_from_url,
        client_id=client_id,
        topic_pattern=run.mqtt_pattern,
        kafka_bootstrap=settings.kafka_bootstrap,
        raw_topic=run.topic("telemetry-raw"),
        dead_letter_topic=run.topic("dead-letters"),
        max_inflight=settings.bridge_max_inflight,
        session_expiry_s=SESSION_EXPIRY_S,
    )
    started = time.perf_counter()
    await bridge.start()
    deadline = started + TIMEOUT_S
    try:
        while bridge.counters.acknowledged < n_messages:
            if time.perf_counter() > deadline:
                raise TimeoutError(
                    f"bridge acknowledged {bridge.counters.acknowledged}"
                    f" of {n_messages}"
                )
            await asyncio.sleep(0.005)
        return time.perf_counter() - started
    finally:
        await bridge.stop()


def _measure(run: BenchRun, role: str, payloads: list[bytes]) -> float:
    client_id = run.client_id(role)
    _open_session(run, client_id, run.mqtt_pattern.replace("{device_id}", "+"))
    try:
        _publish(run, payloads)
        if role.startswith("bare"):
            return _drain_bare(run, client_id, len(payloads))
        return asyncio.run(_drain_bridge(run, client_id, len(payloads)))
    finally:
        _close_session(run, client_id)


def run(
    n_messages: int = 20_000, payload_bytes: int = 100, repeats: int = 2, **_: Any
) -> list[BenchFigure]:
    """Measure the bridge's QoS 1 throughput against a bare paho subscriber.

    Args:
        n_messages: messages pre-loaded for each drain.
        payload_bytes: size of each JSON payload.
        repeats: alternating drains of each side; the fastest counts.

    Returns:
        Messages per second of the bridge against the bare subscriber.
    """
    bench_run = BenchRun(BENCH)
    settings = bench_run.settings
    payloads = _payloads(n_messages, payload_bytes)
    asyncio.run(
        ensure_topics(
            settings.kafka_bootstrap,
            [bench_run.topic("telemetry-raw"), bench_run.topic("dead-letters")],
            partitions=settings.partitions,
        )
    )
    bare_s: list[float] = []
    bridge_s: list[float] = []
    try:
        for attempt in range(max(1, repeats)):
            bare_s.append(_measure(bench_run, f"bare{attempt}", payloads))
            bridge_s.append(_measure(bench_run, f"bridge{attempt}", payloads))
    finally:
        cleanup_topics(bench_run)

    bare_rate = n_messages / min(bare_s)
    bridge_rate = n_messages / min(bridge_s)
    ratio = bridge_rate / bare_rate
    every = ", ".join(
        f"{n_messages / b:,.0f}/{n_messages / a:,.0f}"
        for a, b in zip(bare_s, bridge_s, strict=True)
    )
    return [
        BenchFigure(
            bench=BENCH,
            name="QoS 1 into Kafka",
            value=bridge_rate,
            unit="messages/s",
            baseline=bare_rate,
            baseline_name="bare paho subscriber, QoS 1",
            ratio=ratio,
            target=">= 0.8",
            met=ratio >= 0.8,
            note=f"{n_messages:,} messages of {payload_bytes} B from an offline"
            f" session backlog, fastest of {len(bare_s)}; each drain"
            f" bridge/bare: {every}",
        )
    ]
