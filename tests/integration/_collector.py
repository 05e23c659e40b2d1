"""Helpers of the OTLP export tests: the collector's address and file, Kafka I/O.

``TEST_OTLP_ENDPOINT`` (http://127.0.0.1:4318) is the local stack's collector;
``TEST_COLLECTOR_OUTPUT`` (.stack/data/collector/received.jsonl) the file it
appends every accepted request to, as OTLP/JSON lines.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.integration.brokers import KAFKA, PROJECT_ROOT, port_open

OTLP_ENDPOINT = os.environ.get("TEST_OTLP_ENDPOINT", "http://127.0.0.1:4318")
COLLECTOR_OUTPUT = Path(
    os.environ.get(
        "TEST_COLLECTOR_OUTPUT",
        PROJECT_ROOT / ".stack" / "data" / "collector" / "received.jsonl",
    )
)


def unreachable(what: str, variable: str) -> None:
    message = f"{what} is not reachable; start `edge-otlp stack up` or set {variable}"
    if os.environ.get("REQUIRE_BROKERS") == "1":
        pytest.fail(message + " (REQUIRE_BROKERS=1 forbids skipping)")
    pytest.skip(message)


def require_kafka() -> None:
    host, _, port = KAFKA.split(",")[0].rpartition(":")
    if not port_open(host or "127.0.0.1", int(port)):
        unreachable(f"Kafka at {KAFKA}", "TEST_KAFKA_BOOTSTRAP")


def require_collector() -> None:
    parts = urlsplit(OTLP_ENDPOINT)
    if not port_open(parts.hostname or "127.0.0.1", parts.port or 4318):
        unreachable(
            f"the OpenTelemetry Collector at {OTLP_ENDPOINT}", "TEST_OTLP_ENDPOINT"
        )
    if not COLLECTOR_OUTPUT.parent.is_dir():
        unreachable(
            f"the collector's output {COLLECTOR_OUTPUT}", "TEST_COLLECTOR_OUTPUT"
        )


async def produce(
    items: Iterable[tuple[str, bytes, bytes]],
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    """Send (topic, key, value) triples and wait for every acknowledgement."""
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all")
    await producer.start()
    try:
        futures = [
            await producer.send(t, value=v, key=k, headers=headers) for t, k, v in items
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def committed_offsets(group_id: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


async def wait_for(predicate: Any, *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _attributes(items: list[dict[str, Any]]) -> dict[str, Any]:
    values = {}
    for item in items:
        value = item.get("value", {})
        values[item["key"]] = next(iter(value.values()), None) if value else None
    return values


def received_points(devices: set[str]) -> list[dict[str, Any]]:
    """Summary data points of ``devices`` in the collector's file, flattened."""
    points = []
    for line in _lines():
        for resource in line.get("resourceMetrics", []):
            device = _attributes(resource["resource"]["attributes"]).get("device.id")
            if device not in devices:
                continue
            for scope in resource.get("scopeMetrics", []):
                for metric in scope.get("metrics", []):
                    for point in metric.get("summary", {}).get("dataPoints", []):
                        points.append(
                            {
                                "device_id": device,
                                "metric": metric["name"],
                                "unit": metric.get("unit", ""),
                                **point,
                            }
                        )
    return points


def received_logs(devices: set[str]) -> list[dict[str, Any]]:
    """Log records of ``devices`` in the collector's file, flattened."""
    records = []
    for line in _lines():
        for resource in line.get("resourceLogs", []):
            device = _attributes(resource["resource"]["attributes"]).get("device.id")
            if device not in devices:
                continue
            for scope in resource.get("scopeLogs", []):
                for record in scope.get("logRecords", []):
                    attributes = _attributes(record.get("attributes", []))
                    records.append({"device_id": device, **record, "attrs": attributes})
    return records


def _lines() -> Iterable[dict[str, Any]]:
    if not COLLECTOR_OUTPUT.exists():
        return []
    with COLLECTOR_OUTPUT.open("rb") as handle:
        # The collector flushes in blocks: a last line without its newline is
        # still being written and is read on the next poll.
        return [orjson.loads(line) for line in handle if line.endswith(b"\n")]


async def delete_topics(names: list[str]) -> None:
    """Delete exactly these topics, where they exist (a test's own, at teardown)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        mine = [name for name in names if name in existing]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()
