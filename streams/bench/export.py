"""``bench export``: wire size and encode speed of the OTLP export, per codec.

Builds window summaries from synthetic readings (one reading per second per
series, 60 s windows), encodes them in export batches exactly as the export
service does, and measures:

* bytes per data point on the wire for each codec, against plain (uncompressed)
  OTLP protobuf and against the JSON the devices sent for the same readings
  (estimated as orjson of ``{"time": ms, "<metric>": value, "unit": u}`` per
  reading; the device id travels in the MQTT topic, so it is not counted);
* encode + serialize + compress throughput in data points per second for each
  codec, against encode + serialize alone.

It measures CPU and bytes only: no network, no receiver.
"""

from __future__ import annotations

import math
import random
import sys
import time
from typing import Any

import orjson

from connectors.otlp.encode import ResourceInfo, encode_metrics
from connectors.otlp.exporter import CODECS, compress
from models.records import WindowSummary
from streams.bench import BenchFigure

BENCH = "export"
WINDOW_MS = 60_000
READING_EVERY_MS = 1_000


def _windows(
    n_points: int, n_devices: int, seed: int
) -> tuple[list[WindowSummary], int, int]:
    """Return summaries, the number of readings behind them and their JSON bytes."""
    rng = random.Random(seed)
    metrics = (("temperature", "C", 60.0), ("pressure", "kPa", 101.3))
    summaries: list[WindowSummary] = []
    readings = 0
    device_json_bytes = 0
    start_ms = 1_767_225_600_000
    window = 0
    while len(summaries) < n_points:
        for device in range(n_devices):
            for metric, unit, level in metrics:
                values = []
                window_start = start_ms + window * WINDOW_MS
                for step in range(WINDOW_MS // READING_EVERY_MS):
                    time_ms = window_start + step * READING_EVERY_MS
                    value = round(level + math.sin(step / 9) * 2 + rng.gauss(0, 0.3), 2)
                    values.append(value)
                    payload = {"time": time_ms, metric: value, "unit": unit}
                    device_json_bytes += len(orjson.dumps(payload))
                readings += len(values)
                summaries.append(_summary(f"device-{device:04d}", metric, unit,
                                          window_start, values))  # fmt: skip
                if len(summaries) == n_points:
                    return summaries, readings, device_json_bytes
        window += 1
    return summaries, readings, device_json_bytes


def _summary(
    device_id: str, metric: str, unit: str, start_ms: int, values: list[float]
) -> WindowSummary:
    ordered = sorted(values)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    total = sum(values)
    return WindowSummary(
        device_id=device_id, metric=metric,
        window_start_ms=start_ms, window_end_ms=start_ms + WINDOW_MS,
        count=len(values), sum=total, min=ordered[0], max=ordered[-1],
        mean=total / len(values), last=values[-1],
        p50=quantile(0.5), p95=quantile(0.95), p99=quantile(0.99), unit=unit,
    )  # fmt: skip


def run(
    n_points: int = 20_000,
    n_devices: int = 200,
    batch_points: int = 5_000,
    repeats: int = 5,
    seed: int = 42,
    **_: Any,
) -> list[BenchFigure]:
    """Measure bytes per data point and points per second for every codec.

    Args:
        n_points: window summaries (data points) to encode.
        n_devices: devices they come from (two series each).
        batch_points: data points per export request, as
            ``EDGE_EXPORT_MAX_BATCH_POINTS``.
        repeats: timing runs per codec; the fastest counts.
        seed: seed of the synthetic readings.

    Returns:
        One size figure per codec against protobuf and one against device JSON,
        the protobuf size against device JSON, and one throughput figure per
        codec against encoding without compression.
    """
    summaries, readings, device_json_bytes = _windows(n_points, n_devices, seed)
    info = ResourceInfo(service_instance_id="bench", site="site-1")
    batches = [
        summaries[i : i + batch_points] for i in range(0, len(summaries), batch_points)
    ]
    bodies = [
        encode_metrics(b, resource_info=info).SerializeToString() for b in batches
    ]
    proto_per_point = sum(len(b) for b in bodies) / n_points
    json_per_point = device_json_bytes / n_points
    figures = [
        BenchFigure(
            bench=BENCH,
            name="bytes per point, OTLP protobuf (uncompressed)",
            value=proto_per_point,
            unit="B",
            baseline=json_per_point,
            baseline_name="device JSON per window",
            ratio=proto_per_point / json_per_point,
            note=f"{readings / n_points:.0f} readings per window,"
            f" {json_per_point / (readings / n_points):.1f} B JSON per reading",
        )  # fmt: skip
    ]

    def encode_only() -> None:
        for batch in batches:
            encode_metrics(batch, resource_info=info).SerializeToString()

    for codec in CODECS:
        wire = sum(len(compress(body, codec)) for body in bodies) / n_points
        figures.append(BenchFigure(
            bench=BENCH, name=f"bytes per point, {codec}", value=wire, unit="B",
            baseline=proto_per_point, baseline_name="OTLP protobuf",
            ratio=wire / proto_per_point,
        ))  # fmt: skip
        figures.append(BenchFigure(
            bench=BENCH, name=f"bytes per point, {codec}, vs device JSON", value=wire,
            unit="B", baseline=json_per_point, baseline_name="device JSON per window",
            ratio=wire / json_per_point,
        ))  # fmt: skip

    for codec in CODECS:

        def encode_and_compress(chosen: Any = codec) -> None:
            for batch in batches:
                body = encode_metrics(batch, resource_info=info).SerializeToString()
                compress(body, chosen)

        # Baseline and codec alternate, so a neighbour's load hits both alike.
        base_s, codec_s = _fastest_pair(encode_only, encode_and_compress, repeats)
        rate, base_rate = n_points / codec_s, n_points / base_s
        figures.append(BenchFigure(
            bench=BENCH, name=f"encode+compress, {codec}", value=rate,
            unit="points/s", baseline=base_rate,
            baseline_name="encode+serialize, no compression", ratio=rate / base_rate,
        ))  # fmt: skip
    return figures


def _fastest_pair(first: Any, second: Any, repeats: int) -> tuple[float, float]:
    best = [math.inf, math.inf]
    for _ in range(max(1, repeats)):
        for i, work in enumerate((first, second)):
            started = time.perf_counter()
            work()
            best[i] = min(best[i], time.perf_counter() - started)
    return best[0], best[1]


def main() -> None:
    """Run with defaults and write one line per figure to stdout."""
    for f in run():
        ratio = f"{f.ratio:.3f}" if f.ratio is not None else "-"
        base = f"{f.baseline:,.1f}" if f.baseline is not None else "-"
        sys.stdout.write(
            f"{f.name:<45} {f.value:>12,.1f} {f.unit:<9} baseline {base:>12}"
            f" ({f.baseline_name}) ratio {ratio}\n"
        )


if __name__ == "__main__":
    main()
