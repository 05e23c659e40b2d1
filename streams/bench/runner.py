"""Run benches by name, print one table, keep the results.

Each bench module has ``run(**options) -> list[BenchFigure]``. The runner calls the
chosen ones in a fixed order, formats every figure as one Markdown table row and
keeps a record of the run: one JSON line per figure appended to
``results.jsonl`` and the whole table in ``latest.md``, both in ``bench-results/``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from streams.bench import BenchFigure

# Order of ``bench all``: cheap in-process benches first, live ones after.
BENCH_NAMES = ("nab", "state", "export", "bridge", "worker", "latency")

# Options that shorten a bench under ``--quick``: a smoke run, not a measurement.
QUICK_OPTIONS: dict[str, dict[str, Any]] = {
    "nab": {},
    "state": {"n_series": 10_000},
    "export": {"n_points": 5_000, "repeats": 2},
    "bridge": {"n_messages": 5_000, "repeats": 1},
    "worker": {"n_readings": 10_000},
    "latency": {"duration_s": 3.0},
}

COLUMNS = (
    "figure",
    "value",
    "unit",
    "baseline",
    "baseline value",
    "ratio",
    "target",
    "met",
)


def run_benches(
    names: Iterable[str],
    *,
    quick: bool = False,
    on_done: Callable[[str, list[BenchFigure]], None] | None = None,
) -> list[BenchFigure]:
    """Run the benches in ``names`` in the order of :data:`BENCH_NAMES`.

    Args:
        names: bench names; ``all`` stands for every bench.
        quick: run the short variant of each bench (smoke test, not a figure).
        on_done: called with the name and figures after each bench.

    Returns:
        The figures of every bench, in run order.

    Raises:
        ValueError: for a name that is not a bench.
    """
    wanted = set(names)
    if "all" in wanted:
        wanted = set(BENCH_NAMES)
    unknown = wanted - set(BENCH_NAMES)
    if unknown:
        raise ValueError(
            f"unknown bench {sorted(unknown)!r}; choose from {', '.join(BENCH_NAMES)}"
        )
    figures: list[BenchFigure] = []
    for name in BENCH_NAMES:
        if name not in wanted:
            continue
        module = importlib.import_module(f"streams.bench.{name}")
        options = QUICK_OPTIONS[name] if quick else {}
        found = module.run(**options)
        figures.extend(found)
        if on_done is not None:
            on_done(name, found)
    return figures


def format_number(value: float | None) -> str:
    """Format a figure for the table: three significant decimals, thousands comma.

    >>> format_number(12345.678)
    '12,346'
    >>> format_number(0.81234)
    '0.812'
    >>> format_number(None)
    '-'
    """
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 10:
        return f"{value:.2f}"
    return f"{value:.3g}" if magnitude < 0.001 and value else f"{value:.3f}"


def _met_text(met: bool | None) -> str:
    if met is None:
        return "-"
    return "yes" if met else "**no**"


def table_rows(figures: Sequence[BenchFigure]) -> list[list[str]]:
    """Return one row of cell texts per figure, in :data:`COLUMNS` order."""
    return [
        [
            f"{figure.bench}: {figure.name}",
            format_number(figure.value),
            figure.unit,
            figure.baseline_name or "-",
            format_number(figure.baseline),
            format_number(figure.ratio),
            figure.target or "-",
            _met_text(figure.met),
        ]
        for figure in figures
    ]


def format_table(figures: Sequence[BenchFigure]) -> str:
    """Format the figures as one Markdown table (header, rule, one row each)."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in table_rows(figures):
        cells = [cell.replace("|", "/") for cell in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    """Describe this machine: CPU count and model, RAM, Python, OS."""
    cpu_model = platform.processor() or "unknown"
    ram_bytes = 0
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            total_kib = int(meminfo.readline().split()[1])
            ram_bytes = total_kib * 1024
    except (OSError, ValueError, IndexError):
        pass  # not Linux: keep what platform knows
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_gib": round(ram_bytes / 2**30, 1),
        "python": platform.python_version(),
        "system": platform.platform(terse=True),
    }


def figure_record(
    figure: BenchFigure, *, run_at: datetime, quick: bool, host: dict[str, Any]
) -> dict[str, Any]:
    """Return the JSON-lines record of one figure."""
    return {
        "run_at": run_at.isoformat(timespec="seconds"),
        "quick": quick,
        **dataclasses.asdict(figure),
        "machine": host,
    }


def write_results(
    figures: Sequence[BenchFigure],
    *,
    out_dir: Path,
    quick: bool,
    command: str,
    run_at: datetime | None = None,
) -> tuple[Path, Path]:
    """Append the figures to ``results.jsonl`` and rewrite ``latest.md``.

    Returns:
        The paths of the JSON-lines file and of the Markdown file.
    """
    run_at = run_at or datetime.now(UTC)
    host = machine()
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "results.jsonl"
    with jsonl.open("ab") as sink:
        for figure in figures:
            record = figure_record(figure, run_at=run_at, quick=quick, host=host)
            sink.write(orjson.dumps(record) + b"\n")

    notes = [f"- {f.bench}: {f.name}: {f.note}" for f in figures if f.note]
    latest = out_dir / "latest.md"
    latest.write_text(
        f"# Bench results {run_at.isoformat(timespec='seconds')}\n\n"
        f"Command: `{command}`{' (quick: smoke run)' if quick else ''}\n\n"
        f"Machine: {host['cpus']} CPUs, {host['cpu_model']}, {host['ram_gib']} GiB"
        f" RAM, Python {host['python']}, {host['system']}\n\n"
        + format_table(figures)
        + ("\nNotes:\n\n" + "\n".join(notes) + "\n" if notes else ""),
        encoding="utf-8",
    )
    return jsonl, latest
