"""Score a ``timestamp,value`` CSV file with a detector, reading by reading.

The same path as the worker: one detector per series, ``score_then_learn`` on
each reading in file order. Used by ``edge-otlp score-csv`` and the NAB benchmark.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from models.csvseries import SeriesRow, read_series_rows
from models.detectors import DetectorSpec, build_detector


def read_series_file(path: Path) -> list[SeriesRow]:
    """Read a series CSV file into rows, in file order.

    Args:
        path: A ``timestamp,value`` CSV file, UTF-8.

    Returns:
        The rows of :func:`models.csvseries.read_series_rows`.

    Raises:
        OSError: When the file cannot be read.
        models.csvseries.InvalidSeries: When a line is not ``timestamp,value``.
    """
    return read_series_rows(path.read_text(encoding="utf-8"))


def score_csv(path: Path, spec: DetectorSpec) -> Iterator[tuple[str, str, float]]:
    """Score every reading of a CSV file with a fresh detector.

    Args:
        path: A ``timestamp,value`` CSV file.
        spec: The detector to build.

    Yields:
        ``(timestamp text, value text, anomaly score)`` per row, in file order,
        the texts exactly as in the file.

    Raises:
        OSError: When the file cannot be read.
        models.csvseries.InvalidSeries: When a line is not ``timestamp,value``;
            raised before anything is yielded.
    """
    rows = read_series_file(path)
    detector = build_detector(spec)
    for row in rows:
        score = detector.score_then_learn(row.value, row.time_ms)
        yield row.timestamp_text, row.value_text, score
