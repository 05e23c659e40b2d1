"""Benchmarks behind ``edge-otlp bench ...``: each figure with its own baseline.

Every benchmark measures the project's path and a bare baseline in the same run on
the same machine, and reports both plus their ratio. Results are printed as one
table and appended to ``bench-results/results.jsonl``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BenchFigure:
    """One measured figure of a benchmark.

    ``ratio`` is ``value / baseline`` (or the inverse where lower is better, as
    ``ratio_note`` says); ``target`` states the goal in words, ``met`` whether this
    run reached it (None when the figure has no target).
    """

    bench: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str | None = None
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None
    note: str = ""
