"""``edge-otlp replay``: publish ``timestamp,value`` CSV series over MQTT as devices.

Each file becomes one device (id from the file name unless given) publishing one
JSON reading per row, ``{"time": <epoch ms>, "<metric>": <value>}``, with QoS 1.
Several files are replayed side by side: each file's rows are placed on a common
clock by their offset from the first row of their device, so all devices start
together and the files of one device keep their relative times.
With ``speed`` > 0 the gaps between rows are the event-time gaps divided by
``speed``; with 0 rows go out as fast as the broker takes them.
"""

from __future__ import annotations

import heapq
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from tqdm import tqdm

from models.csvseries import SeriesRow, read_series_rows
from streams.config import Settings

logger = logging.getLogger(__name__)

# Metric names the demo's rule packs use, guessed from NAB file names.
_METRIC_BY_NAME = (
    (re.compile(r"temperature", re.I), "temperature"),
    (re.compile(r"occupancy", re.I), "occupancy"),
    (re.compile(r"speed", re.I), "speed"),
    (re.compile(r"traveltime", re.I), "travel_time"),
    (re.compile(r"cpu", re.I), "cpu_utilization"),
    (re.compile(r"latency", re.I), "latency"),
)
MAX_UNACKED = 1000
# ``<traffic metric>_<sensor id>``: the id names the device.
_TRAFFIC_NAME = re.compile(r"(?:occupancy|speed|traveltime)_([a-z0-9]+)", re.I)


def metric_for(path: Path) -> str:
    """Guess the metric name of a series from its file name (default ``value``)."""
    for pattern, metric in _METRIC_BY_NAME:
        if pattern.search(path.stem):
            return metric
    return "value"


def device_for(path: Path) -> str:
    """Derive a device id from a file name: lowercase, ``[a-z0-9_-]`` only.

    A traffic file named ``<metric>_<sensor id>`` (NAB's ``occupancy_t4013``,
    ``speed_t4013``, ``TravelTime_387``) names its sensor, so the metrics of one
    sensor arrive as one device; rules that combine them need that. Other names
    are kept whole.

    >>> device_for(Path("speed_t4013.csv")), device_for(Path("TravelTime_387.csv"))
    ('t4013', '387')
    >>> device_for(Path("machine_temperature_system_failure.csv"))
    'machine_temperature_system_failure'
    """
    sensor = _TRAFFIC_NAME.fullmatch(path.stem)
    stem = sensor.group(1) if sensor else path.stem
    return re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).strip("-") or "device"


def _schedule(
    series: list[tuple[str, str, list[SeriesRow]]],
) -> Iterator[tuple[float, str, str, SeriesRow]]:
    """Merge the files' rows by their offset from their device's first row.

    The files of one device keep their event times relative to each other, so
    a rule comparing two of its metrics sees readings of the same moment.
    """
    firsts: dict[str, int] = {}
    for device_id, _, rows in series:
        if rows:
            first = min(firsts.get(device_id, rows[0].time_ms), rows[0].time_ms)
            firsts[device_id] = first
    streams = [
        _offsets(rows, firsts[device_id], device_id, metric)
        for device_id, metric, rows in series
        if rows
    ]
    for offset_ms, _, device_id, metric, row in heapq.merge(*streams):
        yield offset_ms / 1000.0, device_id, metric, row


def _offsets(
    rows: list[SeriesRow], first_ms: int, device_id: str, metric: str
) -> Iterator[tuple[int, int, str, str, SeriesRow]]:
    # A function, not a generator expression in the caller's loop: that would
    # see the loop's last device and metric once merged.
    for index, row in enumerate(rows):
        yield row.time_ms - first_ms, index, device_id, metric, row


def replay_files(
    files: list[Path],
    *,
    settings: Settings,
    speed: float = 0.0,
    device_id: str | None = None,
    metric: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> int:
    """Publish every row of ``files``; return how many readings were published.

    Returns only after the broker acknowledged every QoS 1 publish.
    """
    series = []
    for path in files:
        rows = read_series_rows(path.read_text())[:limit]
        series.append((device_id or device_for(path), metric or metric_for(path), rows))
    total = sum(len(rows) for _, _, rows in series)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(MAX_UNACKED)
    unacked = threading.Semaphore(MAX_UNACKED)
    client.on_publish = lambda *args: unacked.release()
    client.connect(settings.mqtt_host, settings.mqtt_port_from_url, keepalive=30)
    client.loop_start()
    template = settings.mqtt_topic_pattern.replace("{site}", settings.site)
    started = time.monotonic()
    published = 0
    try:
        with tqdm(total=total, unit="reading", disable=not progress) as bar:
            for offset_s, device, name, row in _schedule(series):
                if speed > 0:
                    delay = started + offset_s / speed - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                payload = orjson.dumps({"time": row.time_ms, name: row.value})
                unacked.acquire()
                client.publish(template.format(device_id=device), payload, qos=1)
                published += 1
                bar.update(1)
        for _ in range(MAX_UNACKED):
            unacked.acquire()  # wait until the broker acknowledged every publish
    finally:
        client.disconnect()
        client.loop_stop()
    logger.info("replayed readings=%d files=%d", published, len(files))
    return published
