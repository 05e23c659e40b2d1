"""Integration fixtures: real brokers from the local stack, unique names per test.

When a broker is unreachable the tests are skipped with a reason naming the
variable to set, unless ``REQUIRE_BROKERS=1`` (set by ``make test`` and CI), which
turns the skip into a failure, so the suite cannot pass by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.brokers import (
    KAFKA,
    MQTT_HOST,
    MQTT_PORT,
    Processes,
    Run,
    port_open,
)


def _unreachable(what: str, variable: str) -> None:
    message = f"{what} is not reachable; start `edge-otlp stack up` or set {variable}"
    if os.environ.get("REQUIRE_BROKERS") == "1":
        pytest.fail(message + " (REQUIRE_BROKERS=1 forbids skipping)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def brokers() -> None:
    host, _, port = KAFKA.split(",")[0].rpartition(":")
    if not port_open(host or "127.0.0.1", int(port)):
        _unreachable(f"Kafka at {KAFKA}", "TEST_KAFKA_BOOTSTRAP")
    if not port_open(MQTT_HOST, MQTT_PORT):
        _unreachable(f"MQTT at {MQTT_HOST}:{MQTT_PORT}", "TEST_MQTT_URL")


@pytest.fixture
def run(brokers: None) -> Run:
    return Run()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.cleanup()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
