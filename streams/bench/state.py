"""``bench state``: checkpoint bytes and memory per series of the default detector.

Builds 100,000 default detectors, feeds each a few readings of its own series,
then measures the serialised state (what the worker checkpoints into its Faust
table) and the growth of the process RSS while both the live detectors and their
checkpoints are held. The baseline is the same detector pickled, which is what a
table would hold without the compact ``to_bytes()``.
"""

from __future__ import annotations

import math
import pickle
import resource
from typing import Any

from models.detectors import DetectorSpec, build_detector
from streams.bench import BenchFigure


def _rss_bytes() -> int:
    """Return the current resident set size of this process (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * resource.getpagesize()


def run(
    n_series: int = 100_000, readings_per_series: int = 20, seed: int = 42, **_: Any
) -> list[BenchFigure]:
    """Measure state per series for ``n_series`` default detectors.

    Args:
        n_series: How many series (detectors) to hold.
        readings_per_series: Readings fed to each detector; kept small so the
            run stays under a minute, state size does not depend on it.
        seed: Seed of the detectors.

    Returns:
        Serialised bytes per series against pickle, and RSS growth in total and
        per series.
    """
    spec = DetectorSpec(seed=seed)
    rss_before = _rss_bytes()
    detectors = []
    checkpoints = []
    for series in range(n_series):
        detector = build_detector(spec)
        for step in range(readings_per_series):
            value = math.sin(step / 5.0 + series) * 10.0 + series % 97
            detector.score_then_learn(value, step * 60_000)
        detectors.append(detector)
        checkpoints.append(detector.to_bytes())
    rss_growth = _rss_bytes() - rss_before

    state_bytes = sum(len(checkpoint) for checkpoint in checkpoints) / n_series
    pickled_bytes = len(pickle.dumps(detectors[-1]))
    per_series = rss_growth / n_series
    return [
        BenchFigure(
            bench="state",
            name="checkpoint bytes per series",
            value=state_bytes,
            unit="bytes",
            baseline=pickled_bytes,
            baseline_name="same detector, pickle.dumps",
            ratio=round(state_bytes / pickled_bytes, 3),
            target="<= 2048 bytes",
            met=state_bytes <= 2048,
            note="lower is better",
        ),
        BenchFigure(
            bench="state",
            name=f"RSS growth for {n_series} series",
            value=round(rss_growth / 2**20, 1),
            unit="MiB",
            target="< 300 MB for 100,000 series",
            met=rss_growth < 300e6 * n_series / 100_000,
            note=(
                f"{per_series:.0f} bytes per series: live detector plus its "
                f"checkpoint; {readings_per_series} readings each"
            ),
        ),
    ]
