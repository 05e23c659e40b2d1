"""PNG charts of the demo: one per device, series, anomaly scores and decisions.

Each metric of the device gets two stacked panels on a shared time axis: the
readings with NAB's labelled anomaly windows shaded, and the anomaly score with
the threshold line. Decisions are vertical lines on every panel, one colour per
rule. Matplotlib runs headless (Agg); nothing here touches a broker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.dates as mdates  # noqa: E402 - after choosing the backend
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from models.records import Decision  # noqa: E402

# Wide enough that two months of 5-minute readings stay readable.
FIGURE_WIDTH_IN = 15.0
PANEL_HEIGHT_IN = 2.3
DPI = 110
# Matplotlib's date axis counts days since its epoch, 1970-01-01 UTC by default.
MS_PER_DAY = 86_400_000
RULE_COLOURS = ("tab:red", "tab:purple", "tab:orange", "tab:brown", "tab:pink")


@dataclass(frozen=True)
class SeriesPlot:
    """One metric of a device as the chart draws it.

    Attributes:
        metric: the metric name (panel label).
        source: where the readings came from, e.g. the NAB file path.
        times_ms: event times, epoch milliseconds UTC, in file order.
        values: the readings' values, one per time.
        scores: the anomaly score of each reading, in ``[0, 1]``.
        threshold: the score from which a reading is an anomaly.
        detector: the detector that produced the scores.
        labelled_windows: NAB's anomaly windows ``(start_ms, end_ms)``.
    """

    metric: str
    source: str
    times_ms: Sequence[int]
    values: Sequence[float]
    scores: Sequence[float]
    threshold: float
    detector: str = "surprise"
    labelled_windows: Sequence[tuple[int, int]] = field(default_factory=tuple)


def plot_device(
    path: Path,
    *,
    device_id: str,
    series: Sequence[SeriesPlot],
    decisions: Sequence[Decision],
    score_note: str,
) -> Path:
    """Draw one device's chart and write it as a PNG.

    Args:
        path: the PNG to write; its folder is created.
        device_id: the device, for the title.
        series: one entry per metric, drawn top to bottom.
        decisions: the device's decisions, drawn at their event time.
        score_note: how the scores were computed, appended to the title.

    Returns:
        ``path``.
    """
    rows = 2 * len(series)
    fig, axes = plt.subplots(
        rows,
        1,
        sharex=True,
        figsize=(FIGURE_WIDTH_IN, PANEL_HEIGHT_IN * rows + 0.8),
        squeeze=False,
    )
    colours = _rule_colours(decisions)
    for index, one in enumerate(series):
        value_axis = axes[2 * index][0]
        score_axis = axes[2 * index + 1][0]
        _draw_values(value_axis, one)
        _draw_scores(score_axis, one)
        for axis in (value_axis, score_axis):
            _draw_decisions(axis, decisions, colours)

    handles: list[Artist] = [
        Line2D([], [], color=colour, label=f"decision: {rule_id}")
        for rule_id, colour in colours.items()
    ]
    handles.append(Patch(color="tab:green", alpha=0.2, label="NAB labelled window"))
    # Above the top panel, so it hides no reading.
    axes[0][0].legend(
        handles=handles,
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        ncol=len(handles),
        frameon=False,
    )
    bottom = axes[-1][0]
    # Labelled windows past the replayed rows (a shortened run) would stretch it.
    first_ms = min(one.times_ms[0] for one in series if one.times_ms)
    last_ms = max(one.times_ms[-1] for one in series if one.times_ms)
    bottom.set_xlim(_days(first_ms), _days(last_ms))
    dates = mdates.DateFormatter("%Y-%m-%d")  # type: ignore[no-untyped-call]
    bottom.xaxis.set_major_formatter(dates)
    bottom.set_xlabel("event time (UTC)")
    sources = ", ".join(one.source for one in series)
    fig.suptitle(f"device {device_id}: {sources}\n{score_note}", fontsize=10, y=0.995)
    fig.tight_layout()

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _draw_values(axis: Axes, one: SeriesPlot) -> None:
    times = _days_all(one.times_ms)
    axis.plot(times, one.values, linewidth=0.6, color="tab:blue")
    for start_ms, end_ms in one.labelled_windows:
        axis.axvspan(_days(start_ms), _days(end_ms), color="tab:green", alpha=0.2)
    axis.set_ylabel(one.metric, fontsize=9)
    axis.grid(alpha=0.3)


def _draw_scores(axis: Axes, one: SeriesPlot) -> None:
    times = _days_all(one.times_ms)
    axis.plot(times, one.scores, linewidth=0.5, color="tab:gray")
    flagged = [
        (time, score)
        for time, score in zip(times, one.scores, strict=True)
        if score >= one.threshold
    ]
    if flagged:
        flagged_times, flagged_scores = zip(*flagged, strict=True)
        axis.scatter(flagged_times, flagged_scores, s=6, color="tab:red", zorder=3)
    axis.axhline(one.threshold, color="tab:red", linewidth=0.7, linestyle="--")
    for start_ms, end_ms in one.labelled_windows:
        axis.axvspan(_days(start_ms), _days(end_ms), color="tab:green", alpha=0.2)
    axis.set_ylim(0.0, 1.05)
    axis.set_ylabel("anomaly score", fontsize=9)
    axis.grid(alpha=0.3)


def _draw_decisions(
    axis: Axes, decisions: Sequence[Decision], colours: dict[str, str]
) -> None:
    for decision in decisions:
        axis.axvline(
            _days(decision.time_ms),
            color=colours[decision.rule_id],
            linewidth=0.9,
            alpha=0.8,
        )


def _rule_colours(decisions: Sequence[Decision]) -> dict[str, str]:
    rule_ids = sorted({d.rule_id for d in decisions})
    return {
        rule_id: RULE_COLOURS[i % len(RULE_COLOURS)]
        for i, rule_id in enumerate(rule_ids)
    }


def _days_all(times_ms: Sequence[int]) -> list[float]:
    return [t / MS_PER_DAY for t in times_ms]


def _days(time_ms: int) -> float:
    return time_ms / MS_PER_DAY
