"""Helpers of the integration tests: broker addresses, processes, publish, consume.

Addresses come from ``TEST_KAFKA_BOOTSTRAP`` (127.0.0.1:9092), ``TEST_MQTT_URL``
(mqtt://127.0.0.1:1883) and ``TEST_STACK_DIR`` (.stack, the local stack the tests
may restart). Every test names its own topics and MQTT topic pattern, so runs
never see each other's data.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer, TopicPartition

PROJECT_ROOT = Path(__file__).resolve().parents[2]
KAFKA = os.environ.get("TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
MQTT_URL = os.environ.get("TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
MQTT_HOST = urlsplit(MQTT_URL).hostname or "127.0.0.1"
MQTT_PORT = urlsplit(MQTT_URL).port or 1883
STACK_DIR = Path(os.environ.get("TEST_STACK_DIR", PROJECT_ROOT / ".stack"))


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def wait_until(
    predicate: Any, *, timeout_s: float, what: str, every_s: float = 0.2
) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@dataclass
class Run:
    """Names of one test's topics, MQTT topic pattern and client ids."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    @property
    def prefix(self) -> str:
        return f"t{self.id}-"

    def topic(self, name: str) -> str:
        return self.prefix + name

    @property
    def mqtt_pattern(self) -> str:
        return f"t{self.id}/devices/{{device_id}}/telemetry"

    def mqtt_topic(self, device_id: str) -> str:
        return f"t{self.id}/devices/{device_id}/telemetry"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for an edge-otlp process of this run."""
        env = {
            **os.environ,
            "EDGE_KAFKA_BOOTSTRAP": KAFKA,
            "EDGE_MQTT_URL": MQTT_URL,
            "EDGE_TOPIC_PREFIX": self.prefix,
            "EDGE_MQTT_TOPIC_PATTERN": self.mqtt_pattern,
            "EDGE_MQTT_CLIENT_ID": f"bridge-{self.id}",
            "EDGE_LOG_SUMMARY_INTERVAL_S": "2",
            "PYTHONUNBUFFERED": "1",
        }
        env.update(extra)
        return env


class Processes:
    """edge-otlp processes started by one test; all are killed at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, args: list[str], env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "streams", *args],
                cwd=PROJECT_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append(process)
        return process

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def kill9(process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    @staticmethod
    def terminate(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=timeout_s)

    def cleanup(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


class Publisher:
    """A QoS 1 MQTT publisher that reconnects by itself (paho's loop_start)."""

    def __init__(self, client_id: str | None = None) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"pub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.2, 2)
        self._acked = 0
        self._lock = threading.Lock()
        self.client.on_publish = self._on_publish
        self.client.connect(MQTT_HOST, MQTT_PORT, keepalive=10)
        self.client.loop_start()

    def _on_publish(self, *args: Any) -> None:
        with self._lock:
            self._acked += 1

    @property
    def acked(self) -> int:
        with self._lock:
            return self._acked

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos)

    def wait_acked(self, count: int, timeout_s: float = 60.0) -> None:
        wait_until(
            lambda: self.acked >= count,
            timeout_s=timeout_s,
            what=f"{count} MQTT publishes acknowledged (have {self.acked})",
        )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


def consume(
    topics: Iterable[str], *, until: Any, timeout_s: float = 60.0
) -> list[Record]:
    """Read ``topics`` from the beginning until ``until(records)`` or timeout.

    Idle ticks (records with the ``edge_tick`` header) are left out.
    """
    return asyncio.run(_consume(list(topics), until, timeout_s))


async def _consume(topics: list[str], until: Any, timeout_s: float) -> list[Record]:
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=KAFKA,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[Record] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not until(records):
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                records.extend(
                    Record(
                        m.topic,
                        m.partition,
                        m.offset,
                        m.key,
                        m.value,
                        dict(m.headers or ()),
                    )
                    for m in messages
                    # The bridge's idle ticks, which subscribers skip (README).
                    if not any(name == "edge_tick" for name, _ in m.headers or ())
                )
    finally:
        await consumer.stop()
    records.sort(key=lambda r: (r.topic, r.partition, r.offset))
    return records


def end_offsets(topic: str) -> int:
    """Total number of records in ``topic`` (sum of partition end offsets)."""

    async def go() -> int:
        consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA)
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                await consumer._client.force_metadata_update()  # noqa: SLF001
                partitions = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in partitions]
            ends = await consumer.end_offsets(tps)
            return sum(ends.values())
        finally:
            await consumer.stop()

    return asyncio.run(go())
