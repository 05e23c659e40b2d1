"""The demo, shortened, against the running local stack: accounting and charts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from tests.integration._collector import (
    COLLECTOR_OUTPUT,
    OTLP_ENDPOINT,
    require_collector,
    require_kafka,
)
from tests.integration.brokers import KAFKA, MQTT_URL, PROJECT_ROOT

# The quick demo replays 2 x 600 readings; start-up of the worker takes most of
# the time. The bound covers both with room for a busy two-core machine.
DEMO_TIMEOUT_S = 150


def test_quick_demo_accounts_for_every_reading_and_draws_each_device(
    brokers: None, tmp_path: Path
) -> None:
    """Every replayed reading is in an exported window or dead-lettered."""
    require_kafka()
    require_collector()
    out_dir = tmp_path / "demo"
    env = {
        **os.environ,
        "EDGE_KAFKA_BOOTSTRAP": KAFKA,
        "EDGE_MQTT_URL": MQTT_URL,
        "EDGE_OTLP_ENDPOINT": OTLP_ENDPOINT,
    }

    completed = subprocess.run(
        [sys.executable, "-m", "streams", "demo", "--quick", "--no-stack",
         "--out-dir", str(out_dir), "--timeout-s", "60",
         "--collector-output", str(COLLECTOR_OUTPUT)],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
        timeout=DEMO_TIMEOUT_S,
    )  # fmt: skip

    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    summary = orjson.loads((out_dir / "summary.json").read_bytes())
    accounted = summary["exported_window_count"] + summary["dead_lettered_readings"]
    assert summary["published"] == 1200
    assert accounted == summary["published"]
    assert summary["balanced"] is True
    assert "accounting:" in completed.stdout
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert pngs == ["machine_temperature_system_failure.png", "t4013.png"]
    assert all((out_dir / name).stat().st_size > 10_000 for name in pngs)
