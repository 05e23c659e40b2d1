"""``bench state``: bytes and memory per series, as the worker keeps them.

Feeds ``n_series`` devices (one metric each) a few readings each through
:meth:`streams.pipeline.Pipeline.process_raw`, with a dict as the table, exactly
as the worker's agent does. Then it measures:

* the detector's checkpoint per series (its ``to_bytes()``), against the same
  detector pickled: what a table would hold without the compact encoding;
* the whole per-series record the worker's ``devices`` table holds (open
  windows with their quantile sketches, detector, rule state, applied offset);
* the growth of the process RSS while the 100,000 records are held, which is
  what the worker's in-memory table costs. The worker also keeps up to
  ``DEFAULT_MAX_CACHED`` devices decoded (see :mod:`streams.tablestore`); the
  note gives what one decoded series costs.
"""

from __future__ import annotations

import gc
import math
import pickle
import resource
import time
from typing import Any

import orjson

from models.detectors import DetectorSpec, build_detector
from streams.app import pipeline_config
from streams.bench import BenchFigure
from streams.config import load_settings
from streams.pipeline import Pipeline
from streams.tablestore import DEFAULT_MAX_CACHED


def _rss_bytes() -> int:
    """Return the current resident set size of this process (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * resource.getpagesize()


def run(
    n_series: int = 100_000, readings_per_series: int = 5, seed: int = 42, **_: Any
) -> list[BenchFigure]:
    """Measure state per series for ``n_series`` series of the default pipeline.

    Args:
        n_series: How many series (devices of one metric) to hold.
        readings_per_series: Readings fed to each series, a second apart, so
            each has an open window; kept small so the run stays near a minute.
            A window of 60 readings adds about 200 bytes (its sketch and the
            keys that detect redelivered readings).
        seed: Seed of the detector of the pickle baseline.

    Returns:
        Detector checkpoint bytes against pickle, table bytes per series, RSS
        growth for the held records.
    """
    settings = load_settings()
    now_ms = time.time_ns() // 1_000_000
    pipeline = Pipeline(pipeline_config(settings), clock_ms=lambda: now_ms)
    start_ms = now_ms - 3_600_000
    table: dict[bytes, bytes] = {}
    gc.collect()
    rss_before = _rss_bytes()
    for series in range(n_series):
        device_id = f"dev{series:06d}"
        for step in range(readings_per_series):
            value = math.sin(step / 5.0 + series) * 10.0 + series % 97
            time_ms = start_ms + step * 1000
            pipeline.process_raw(
                device_id=device_id,
                payload=orjson.dumps({"time": time_ms, "temperature": value}),
                received_ms=time_ms,
                source="bench",
                partition=0,
                offset=step,
                store=table,
            )
    gc.collect()
    rss_growth = _rss_bytes() - rss_before

    record_bytes = sum(len(v) for v in table.values()) / n_series
    _size, live = pipeline.inspect_device(next(iter(table.values())))["temperature"]
    detector_bytes = len(live.detector.to_bytes())  # type: ignore[attr-defined]
    detector = build_detector(DetectorSpec(seed=seed))
    for step in range(readings_per_series):
        detector.score_then_learn(math.sin(step / 5.0) * 10.0, step * 1000)
    pickled_bytes = len(pickle.dumps(detector))
    decoded_bytes = _decoded_bytes(next(iter(table.values())), pipeline)
    return [
        BenchFigure(
            bench="state",
            name="detector checkpoint bytes per series",
            value=detector_bytes,
            unit="bytes",
            baseline=pickled_bytes,
            baseline_name="same detector, pickle.dumps",
            ratio=round(detector_bytes / pickled_bytes, 3),
            target="<= 2048 bytes",
            met=detector_bytes <= 2048,
            note="lower is better",
        ),
        BenchFigure(
            bench="state",
            name="table record bytes per series (windows, detector, rules)",
            value=round(record_bytes),
            unit="bytes",
            baseline=detector_bytes,
            baseline_name="detector checkpoint alone",
            ratio=round(record_bytes / detector_bytes, 3),
            note=f"{readings_per_series} readings in the open window of each series",
        ),
        BenchFigure(
            bench="state",
            name=f"RSS growth holding {n_series:,} series",
            value=round(rss_growth / 2**20, 1),
            unit="MiB",
            target="< 300 MB for 100,000 series",
            met=rss_growth < 300e6 * n_series / 100_000,
            note=(
                f"{rss_growth / n_series:.0f} bytes per series held as the"
                f" worker's table holds them; plus up to {DEFAULT_MAX_CACHED:,}"
                f" devices kept decoded, about {decoded_bytes:,} bytes per series"
            ),
        ),
    ]


def _decoded_bytes(record: bytes, pipeline: Pipeline) -> int:
    """Return the RSS cost of one decoded series, measured over 2,000 copies."""
    gc.collect()
    before = _rss_bytes()
    held = []
    for _ in range(2_000):
        held.append(pipeline.inspect_device(record))
    gc.collect()
    return max(0, (_rss_bytes() - before) // len(held))
