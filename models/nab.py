"""Score anomaly detectors the way the Numenta Anomaly Benchmark does.

This is the project's own implementation of the method of Lavin and Ahmad (2015),
"Evaluating Real-time Anomaly Detection Algorithms: the Numenta Anomaly Benchmark".
A detector sees each reading of a series once, in order, and emits an anomaly score;
a detection is a score at or above one threshold shared by the whole corpus:

- The first ``min(15% of rows, 750)`` rows of each series are a probationary period:
  they are neither rewarded nor penalised.
- Inside a labelled window only the earliest detection counts, rewarded by a scaled
  sigmoid of its position: almost the full ``tp_weight`` at the window's start,
  nothing at its end.
- A detection outside every window costs ``fp_weight``, less when it falls just
  after a window (a late detection is a smaller mistake), fully otherwise.
- A window without a detection costs ``fn_weight``.
- The threshold is swept over every distinct score and the best is kept; the raw
  total is normalised so that never detecting scores 0 and detecting every window
  at its first row scores 100.

Pure: labels and scores come in as values, nothing is read from disk here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from models.csvseries import parse_time_ms

PROBATION_FRACTION = 0.15
# 15% of NAB's longest-file convention of 5,000 rows.
PROBATION_MAX_ROWS = 750


@dataclass(frozen=True, slots=True)
class Profile:
    """An application profile: weights of true positives, false positives, misses.

    Attributes:
        name: The profile's NAB name.
        tp_weight: Reward for a window detected at its very start.
        fp_weight: Cost of one detection far from any window.
        fn_weight: Cost of one window without a detection.
    """

    name: str
    tp_weight: float
    fp_weight: float
    fn_weight: float


PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile("standard", tp_weight=1.0, fp_weight=0.11, fn_weight=1.0),
        Profile("reward_low_FP_rate", tp_weight=1.0, fp_weight=0.22, fn_weight=1.0),
        Profile("reward_low_FN_rate", tp_weight=1.0, fp_weight=0.11, fn_weight=2.0),
    )
}


@dataclass(frozen=True, slots=True)
class LabelledSeries:
    """One series' anomaly scores with its labelled windows as row indices.

    Attributes:
        name: The series name, unique in a corpus.
        scores: One anomaly score per row, in row order.
        windows: ``(first_row, last_row)`` per window, both inclusive, in order,
            not overlapping.
    """

    name: str
    scores: Sequence[float]
    windows: Sequence[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class CorpusScore:
    """The result of scoring a corpus under one profile.

    Attributes:
        profile: The profile's name.
        threshold: The best threshold: a score at or above it is a detection.
        raw: The raw total at that threshold.
        null: The raw total of a detector that never detects.
        perfect: The raw total of a detector that detects every window at its
            first row.
        score: ``100 * (raw - null) / (perfect - null)``.
        detections: Rows at or above the threshold, outside probation.
        windows_detected: Windows with at least one detection.
        windows: Windows that can be scored (not wholly in probation).
    """

    profile: str
    threshold: float
    raw: float
    null: float
    perfect: float
    score: float
    detections: int
    windows_detected: int
    windows: int


def probation_rows(n_rows: int) -> int:
    """Return how many leading rows of a series are not scored.

    >>> probation_rows(1000), probation_rows(22695)
    (150, 750)
    """
    return min(math.floor(PROBATION_FRACTION * n_rows), PROBATION_MAX_ROWS)


def scaled_sigmoid(position: float) -> float:
    """Return the reward or penalty for a detection at a relative position.

    Args:
        position: -1 at a window's first row, 0 just after its last row; positive
            values measure the distance past a window in window widths.

    Returns:
        ``2 / (1 + exp(5 * position)) - 1``, in ``(-1, 1)``; exactly -1 from three
        widths past a window on, where a detection is simply a false positive.

    >>> round(scaled_sigmoid(-1.0), 5), scaled_sigmoid(0.0), scaled_sigmoid(3.0)
    (0.98661, 0.0, -1.0)
    """
    if position >= 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * position)) - 1.0


def window_rows(
    times_ms: Sequence[int], windows_ms: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Map windows given as time spans to inclusive row indices.

    A window runs from the first row at or after its start to the last row at or
    before its end. Rows are taken in order; times need not be sorted but NAB's
    are. A window that contains no row is dropped.

    Args:
        times_ms: Event time of each row, epoch milliseconds.
        windows_ms: ``(start_ms, end_ms)`` per window, both inclusive.

    Returns:
        ``(first_row, last_row)`` per window that has rows, in the input order.
    """
    rows: list[tuple[int, int]] = []
    for start_ms, end_ms in windows_ms:
        inside = [i for i, t in enumerate(times_ms) if start_ms <= t <= end_ms]
        if inside:
            rows.append((inside[0], inside[-1]))
    return rows


def parse_windows(text: str) -> dict[str, list[tuple[int, int]]]:
    """Parse NAB's ``combined_windows.json`` text into time spans per series.

    Args:
        text: JSON mapping a series path such as ``realTraffic/speed_6005.csv``
            to a list of ``[start, end]`` timestamp pairs (read as UTC).

    Returns:
        Series path to ``(start_ms, end_ms)`` pairs.

    Raises:
        ValueError: When the text is not JSON of that shape.
    """
    data = json.loads(text)
    if not isinstance(data, dict):
        message = f"windows must be a JSON object (got {type(data).__name__})"
        raise ValueError(message)
    return {
        name: [(parse_time_ms(start), parse_time_ms(end)) for start, end in spans]
        for name, spans in data.items()
    }


@dataclass(frozen=True, slots=True)
class _Row:
    """A scorable row: its anomaly score, its weight, its window (or -1)."""

    score: float
    weight: float
    window: int


def _weigh_rows(
    series: LabelledSeries, profile: Profile, first_window: int
) -> tuple[list[_Row], list[int]]:
    """Weigh each scorable row of a series as if it were a detection.

    Returns the rows and the corpus-wide ids of the windows that can be scored.
    """
    n_rows = len(series.scores)
    probation = probation_rows(n_rows)
    max_reward = scaled_sigmoid(-1.0)
    window_at = [-1] * n_rows
    for offset, (first, last) in enumerate(series.windows):
        for i in range(first, last + 1):
            window_at[i] = offset

    rows: list[_Row] = []
    scorable: set[int] = set()
    previous_last = -1
    previous_width = 0
    for i, score in enumerate(series.scores):
        offset = window_at[i]
        if offset >= 0:
            first, last = series.windows[offset]
            width = last - first + 1
            # -1 at the first row; the last row sits at -1/width, not at 0.
            position = -(last - i + 1) / width
            weight = scaled_sigmoid(position) * profile.tp_weight / max_reward
            if last == i:
                previous_last, previous_width = last, width
        elif previous_last < 0 or previous_width < 2:
            # No window before this row: a plain false positive.
            weight = -profile.fp_weight
        else:
            position = (i - previous_last) / (previous_width - 1)
            weight = scaled_sigmoid(position) * profile.fp_weight

        if i >= probation:
            window = first_window + offset if offset >= 0 else -1
            rows.append(_Row(score, weight, window))
            if window >= 0:
                scorable.add(window)
    return rows, sorted(scorable)


def sweep_thresholds(
    corpus: Sequence[LabelledSeries], profile: Profile
) -> list[tuple[float, float, int, int]]:
    """Compute the raw corpus total for every distinct threshold.

    Args:
        corpus: The scored series.
        profile: The weights to apply.

    Returns:
        ``(threshold, raw, detections, windows_detected)`` from the highest
        threshold to the lowest. The first entry, threshold ``inf``, is the total
        with no detection at all.
    """
    rows: list[_Row] = []
    windows: list[int] = []
    first_window = 0
    for series in corpus:
        series_rows, series_windows = _weigh_rows(series, profile, first_window)
        rows.extend(series_rows)
        windows.extend(series_windows)
        first_window += len(series.windows)
    rows.sort(key=lambda row: row.score, reverse=True)

    best_reward = dict.fromkeys(windows, -profile.fn_weight)
    fp_total = 0.0
    raw = -profile.fn_weight * len(windows)
    detected = 0
    totals = [(math.inf, raw, 0, 0)]
    for index, row in enumerate(rows):
        if row.window < 0:
            fp_total += row.weight
            raw += row.weight
        elif row.weight > best_reward[row.window]:
            if best_reward[row.window] == -profile.fn_weight:
                detected += 1
            raw += row.weight - best_reward[row.window]
            best_reward[row.window] = row.weight

        # Equal scores are one threshold: record only after the last of them.
        is_last = index + 1 == len(rows) or rows[index + 1].score != row.score
        if is_last:
            totals.append((row.score, raw, index + 1, detected))
    return totals


def score_corpus(corpus: Sequence[LabelledSeries], profile: Profile) -> CorpusScore:
    """Score a corpus under one profile at its best single threshold.

    Ties between thresholds go to the highest one (fewest detections). The raw
    total is re-summed per window at that threshold, so float rounding in the
    running sums of the sweep does not leak into the figure.

    Args:
        corpus: The scored series, with their windows.
        profile: The weights to apply.

    Returns:
        The normalised score and the figures behind it.

    Raises:
        ValueError: When no window in the corpus can be scored (the score would
            divide by zero).
    """
    totals = sweep_thresholds(corpus, profile)
    best = max(totals, key=lambda entry: entry[1])
    threshold = best[0]
    null = totals[0][1]
    n_windows = round(-null / profile.fn_weight) if profile.fn_weight else 0
    if n_windows == 0:
        message = "corpus has no window outside the probationary period to score"
        raise ValueError(message)

    perfect = profile.tp_weight * n_windows
    raw = raw_score(corpus, profile, threshold)
    return CorpusScore(
        profile=profile.name,
        threshold=threshold,
        raw=raw,
        null=null,
        perfect=perfect,
        score=100.0 * (raw - null) / (perfect - null),
        detections=best[2],
        windows_detected=best[3],
        windows=n_windows,
    )


def raw_score(
    corpus: Sequence[LabelledSeries], profile: Profile, threshold: float
) -> float:
    """Return the raw total of a corpus at a fixed threshold.

    Args:
        corpus: The scored series, with their windows.
        profile: The weights to apply.
        threshold: A score at or above it is a detection.

    Returns:
        Sum of window rewards (or ``-fn_weight`` per missed window) and of false
        positive weights, over all series.
    """
    total = 0.0
    for series in corpus:
        rows, windows = _weigh_rows(series, profile, 0)
        best_reward = dict.fromkeys(windows, -profile.fn_weight)
        for row in rows:
            if row.score < threshold:
                continue
            if row.window < 0:
                total += row.weight
            else:
                best_reward[row.window] = max(best_reward[row.window], row.weight)
        total += math.fsum(best_reward.values())
    return total
