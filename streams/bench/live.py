"""What the live benches share: unique names, brokers, child processes, clean-up.

The live benches (bridge, worker, latency) talk to the brokers of the local stack
on loopback. Each run names its own Kafka topics (a unique prefix), MQTT topics and
client ids, and deletes exactly the topics that carry its prefix when done. Child
processes are started in their own session, stopped with SIGTERM, and killed if
they do not stop within a bounded time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka.admin import AIOKafkaAdminClient

from streams.config import PROJECT_ROOT, Settings, load_settings

logger = logging.getLogger(__name__)


@dataclass
class BenchRun:
    """Names of one live bench run: Kafka prefix, MQTT topics, client ids."""

    label: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    settings: Settings = field(default_factory=load_settings)
    log_dir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="edge-otlp-bench-"))
    )

    @property
    def prefix(self) -> str:
        """Kafka topic prefix of this run."""
        return f"bench-{self.label}-{self.id}-"

    def topic(self, name: str) -> str:
        """Full Kafka topic name of ``name`` in this run."""
        return self.prefix + name

    @property
    def mqtt_pattern(self) -> str:
        """MQTT topic pattern of this run (``{device_id}`` placeholder)."""
        return f"bench/{self.label}-{self.id}/{{device_id}}/telemetry"

    def mqtt_topic(self, device_id: str) -> str:
        """MQTT topic a device of this run publishes to."""
        return self.mqtt_pattern.replace("{device_id}", device_id)

    def client_id(self, role: str) -> str:
        """MQTT client id of ``role`` in this run."""
        return f"bench-{self.label}-{self.id}-{role}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of an edge-otlp child process of this run."""
        env = {
            **os.environ,
            "EDGE_KAFKA_BOOTSTRAP": self.settings.kafka_bootstrap,
            "EDGE_MQTT_URL": self.settings.mqtt_url,
            "EDGE_TOPIC_PREFIX": self.prefix,
            "EDGE_MQTT_TOPIC_PATTERN": self.mqtt_pattern,
            "EDGE_MQTT_CLIENT_ID": self.client_id("bridge"),
            "EDGE_DATA_DIR": str(self.log_dir / "data"),
            "EDGE_EXPORT_ENABLED": "false",
            "EDGE_MQTT_SESSION_EXPIRY_S": "300",
            "PYTHONUNBUFFERED": "1",
        }
        env.update(extra)
        return env


def free_port() -> int:
    """Return a TCP port on loopback that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_process(
    run: BenchRun, name: str, args: list[str], env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start ``python -m streams ARGS`` with its output in the run's log folder."""
    with (run.log_dir / f"{name}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "streams", *args],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """Stop a child with SIGTERM; kill it after ``timeout_s``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def get_json(url: str, timeout_s: float = 2.0) -> Any:
    """GET ``url`` and decode its JSON body, whatever the status; None if down."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
            return orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return orjson.loads(exc.read() or b"null")
    except (OSError, ValueError):
        return None


def wait_for(
    predicate: Callable[[], bool], *, timeout_s: float, what: str, every_s: float = 0.1
) -> None:
    """Poll ``predicate`` until it holds.

    Raises:
        TimeoutError: naming ``what`` after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


async def delete_run_topics(run: BenchRun) -> list[str]:
    """Delete the Kafka topics whose name starts with this run's unique prefix."""
    admin = AIOKafkaAdminClient(bootstrap_servers=run.settings.kafka_bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(run.prefix)]
        if names:
            await admin.delete_topics(names)
        return names
    finally:
        await admin.close()


def cleanup_topics(run: BenchRun) -> None:
    """Delete this run's topics; log and go on when Kafka refuses."""
    try:
        asyncio.run(delete_run_topics(run))
    except Exception:  # noqa: BLE001 - clean-up must not hide the bench result
        logger.warning("could not delete the topics of prefix=%s", run.prefix)


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ``values`` (0 < fraction <= 1).

    >>> percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5)
    3.0
    """
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]
