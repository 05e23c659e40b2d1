"""Tests of the per-series event-time windows."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import pytest
from datasketches import kll_doubles_sketch

from models.records import WindowSummary
from models.windows import (
    SKETCH_K,
    AddResult,
    ClosedWindow,
    SeriesWindows,
    WindowSpec,
    summarize,
)

MINUTE_MS = 60_000


def tumbling(lateness_ms: int = 0, **options: Any) -> SeriesWindows:
    options.setdefault("idle_timeout_ms", 120_000)
    spec = WindowSpec(size_ms=MINUTE_MS, allowed_lateness_ms=lateness_ms, **options)
    return SeriesWindows(spec)


def spans(closed: Sequence[ClosedWindow]) -> list[tuple[int, int, int]]:
    return [(w.window_start_ms, w.window_end_ms, w.count) for w in closed]


def test_reading_at_window_end_belongs_to_the_next_window() -> None:
    windows = tumbling()
    windows.add(0, 1.0, now_wall_ms=0)
    windows.add(59_999, 2.0, now_wall_ms=0)

    result = windows.add(60_000, 3.0, now_wall_ms=0)

    assert result == AddResult(True, False, False, result.closed)
    assert spans(result.closed) == [(0, 60_000, 2)]
    assert spans(windows.close_idle(now_wall_ms=120_000)) == [(60_000, 120_000, 1)]


def test_window_closes_when_watermark_reaches_end_plus_lateness() -> None:
    windows = tumbling(lateness_ms=5_000)
    windows.add(10_000, 1.0, now_wall_ms=0)

    before = windows.add(64_999, 2.0, now_wall_ms=0)
    at = windows.add(65_000, 3.0, now_wall_ms=0)

    assert before.closed == ()
    assert spans(at.closed) == [(0, 60_000, 1)]


def test_out_of_order_reading_within_lateness_is_counted() -> None:
    windows = tumbling(lateness_ms=5_000)
    windows.add(10_000, 1.0, now_wall_ms=0)
    windows.add(64_000, 2.0, now_wall_ms=0)

    result = windows.add(59_000, 4.0, now_wall_ms=0)
    closed = windows.add(70_000, 0.0, now_wall_ms=0).closed

    assert result == AddResult(True, False, False)
    assert spans(closed) == [(0, 60_000, 2)]
    assert closed[0].last == 4.0
    assert closed[0].sum == 5.0


def test_reading_beyond_lateness_is_reported_late_and_changes_nothing() -> None:
    windows = tumbling(lateness_ms=5_000)
    windows.add(10_000, 1.0, now_wall_ms=0)
    windows.add(65_000, 2.0, now_wall_ms=0)
    state = windows.to_bytes()

    result = windows.add(59_999, 3.0, now_wall_ms=0)

    assert result == AddResult(False, False, True)
    assert windows.to_bytes() == state


def test_redelivered_reading_is_counted_once() -> None:
    windows = tumbling()
    windows.add(1_000, 1.0, now_wall_ms=0)

    again = windows.add(1_000, 1.0, now_wall_ms=0)
    other_value = windows.add(1_000, 2.0, now_wall_ms=0)
    closed = windows.close_idle(now_wall_ms=120_000)

    assert again == AddResult(False, True, False)
    assert other_value == AddResult(True, False, False)
    assert [(w.count, w.sum, w.last) for w in closed] == [(2, 3.0, 2.0)]


def test_last_is_the_value_with_greatest_time_not_the_last_arrival() -> None:
    windows = tumbling(lateness_ms=10_000)
    for time_ms, value in [(5_000, 1.0), (9_000, 2.0), (7_000, 3.0)]:
        windows.add(time_ms, value, now_wall_ms=0)

    (closed,) = windows.close_idle(now_wall_ms=120_000)

    assert closed.last == 2.0


def test_idle_series_emits_its_open_windows() -> None:
    windows = tumbling(lateness_ms=30_000)
    windows.add(50_000, 1.0, now_wall_ms=1_000)
    windows.add(70_000, 2.0, now_wall_ms=2_000)

    too_early = windows.close_idle(now_wall_ms=121_999)
    closed = windows.close_idle(now_wall_ms=122_000)

    assert too_early == ()
    assert spans(closed) == [(0, 60_000, 1), (60_000, 120_000, 1)]
    assert {w.closed_by for w in closed} == {"idle"}
    assert windows.next_deadline_ms is None
    assert windows.add(119_999, 3.0, now_wall_ms=130_000).late


def test_idle_clock_keeps_the_window_of_a_device_that_pauses_within_it() -> None:
    """A pause longer than the idle timeout closes nothing still under way."""
    windows = tumbling(lateness_ms=10_000, idle_timeout_ms=30_000)
    windows.add(1_000, 1.0, now_wall_ms=1_000)

    paused = windows.close_idle(now_wall_ms=46_000)
    resumed = windows.add(46_000, 2.0, now_wall_ms=46_000)
    deadline_ms = windows.next_deadline_ms
    too_early = windows.close_idle(now_wall_ms=75_999)
    closed = windows.close_idle(now_wall_ms=76_000)

    assert paused == ()
    assert resumed == AddResult(True, False, False)
    # End 60 s plus lateness 10 s passed on the device's clock, and idle 30 s.
    assert deadline_ms == 76_000
    assert too_early == ()
    assert [(w.count, w.closed_by) for w in closed] == [(2, "idle")]


def test_idle_clock_follows_the_device_clock_not_the_wall_clock() -> None:
    """Event times an hour behind the wall clock close as if they were current."""
    lag_ms = 3_600_000
    windows = tumbling(lateness_ms=10_000, idle_timeout_ms=30_000)
    windows.add(50_000, 1.0, now_wall_ms=50_000 + lag_ms)

    early = windows.close_idle(now_wall_ms=50_000 + lag_ms + 19_999)
    due = windows.close_idle(now_wall_ms=50_000 + lag_ms + 30_000)

    assert early == ()
    assert spans(due) == [(0, 60_000, 1)]


def test_idle_clock_and_watermark_give_the_same_windows_whatever_the_pauses() -> None:
    rng = random.Random(7)
    spec = WindowSpec(
        size_ms=MINUTE_MS, idle_timeout_ms=5_000, allowed_lateness_ms=2_000
    )
    paused, steady = SeriesWindows(spec), SeriesWindows(spec)
    time_ms = 0
    got: list[ClosedWindow] = []
    want: list[ClosedWindow] = []

    for _ in range(300):
        time_ms += rng.choice([1_000, 2_000, 20_000, 45_000])
        value = rng.random()
        # The wall clock runs with the device's clock, polled every second.
        for wall_ms in range(time_ms - time_ms % 1_000 - 40_000, time_ms, 1_000):
            got += paused.close_idle(now_wall_ms=wall_ms)
        got += paused.add(time_ms, value, now_wall_ms=time_ms).closed
        want += steady.add(time_ms, value, now_wall_ms=time_ms).closed

    assert [(w.window_start_ms, w.count, w.sum) for w in got] == [
        (w.window_start_ms, w.count, w.sum) for w in want
    ]


def test_idle_all_closes_every_open_window_and_later_readings_are_late() -> None:
    windows = tumbling(lateness_ms=10_000, idle_timeout_ms=30_000, idle_close="all")
    windows.add(1_000, 1.0, now_wall_ms=1_000)

    closed = windows.close_idle(now_wall_ms=31_000)
    after = windows.add(40_000, 2.0, now_wall_ms=40_000)

    assert [(w.count, w.closed_by) for w in closed] == [(1, "idle")]
    assert after == AddResult(False, False, True)


def test_next_deadline_follows_the_last_reading_wall_time() -> None:
    windows = tumbling()

    empty = windows.next_deadline_ms
    windows.add(1_000, 1.0, now_wall_ms=5_000)
    windows.add(2_000, 1.0, now_wall_ms=4_000)

    assert empty is None
    assert windows.next_deadline_ms == 125_000


def test_far_future_reading_closes_open_windows_and_opens_one() -> None:
    windows = tumbling(lateness_ms=MINUTE_MS)
    windows.add(0, 1.0, now_wall_ms=0)

    result = windows.add(1_000 * MINUTE_MS, 2.0, now_wall_ms=0)

    assert spans(result.closed) == [(0, MINUTE_MS, 1)]
    assert windows.open_window_count == 1


def test_hopping_windows_give_each_reading_to_size_over_step_windows() -> None:
    spec = WindowSpec(
        size_ms=60_000, step_ms=20_000, idle_timeout_ms=1, idle_close="all"
    )
    windows = SeriesWindows(spec)
    times = range(0, 120_000, 10_000)
    closed: list[ClosedWindow] = []

    for time_ms in times:
        closed += windows.add(time_ms, float(time_ms), now_wall_ms=0).closed
    closed += windows.close_idle(now_wall_ms=1)

    expected = [
        (start, start + 60_000, sum(start <= t < start + 60_000 for t in times))
        for start in range(-40_000, 120_000, 20_000)
    ]
    assert spans(closed) == expected
    assert sum(w.count for w in closed) == 3 * len(times)
    assert {w.kind for w in closed} == {"hopping"}


def test_hopping_reading_late_for_old_windows_still_counts_in_new_ones() -> None:
    spec = WindowSpec(
        size_ms=60_000, step_ms=20_000, idle_timeout_ms=1, idle_close="all"
    )
    windows = SeriesWindows(spec)
    windows.add(100_000, 1.0, now_wall_ms=0)

    all_closed = windows.add(50_000, 2.0, now_wall_ms=0)
    partly = windows.add(70_000, 3.0, now_wall_ms=0)
    closed = windows.close_idle(now_wall_ms=1)

    assert all_closed == AddResult(False, False, True)
    assert partly == AddResult(True, False, True)
    assert spans(closed) == [
        (60_000, 120_000, 2),
        (80_000, 140_000, 1),
        (100_000, 160_000, 1),
    ]


def test_quantiles_are_exact_with_linear_interpolation() -> None:
    windows = tumbling()
    for second in range(101):
        windows.add(second * 100, float(100 - second), now_wall_ms=0)

    (closed,) = windows.close_idle(now_wall_ms=120_000)

    assert (closed.p50, closed.p95, closed.p99) == (50.0, 95.0, 99.0)
    assert (closed.min, closed.max, closed.count, closed.sum) == (
        0.0,
        100.0,
        101,
        5050.0,
    )
    assert closed.complete


def test_redelivery_older_than_the_kept_readings_is_counted_again() -> None:
    windows = tumbling(kept_readings_per_pane=3)
    for time_ms in range(5):
        windows.add(time_ms, float(time_ms), now_wall_ms=0)

    repeat_spilled = windows.add(1, 1.0, now_wall_ms=0)
    repeat_kept = windows.add(4, 4.0, now_wall_ms=0)
    (closed,) = windows.close_idle(now_wall_ms=120_000)

    assert not repeat_spilled.duplicate
    assert repeat_kept.duplicate
    assert (closed.count, closed.sum, closed.min, closed.max) == (6, 11.0, 0.0, 4.0)
    assert closed.last == 4.0
    assert not closed.complete


def test_busy_pane_keeps_exact_aggregates_and_estimates_quantiles() -> None:
    """100,000 readings in one window: exact count and sum, sketch quantiles."""
    rng = random.Random(7)
    # Two readings per millisecond, each with its own value.
    values = [index + rng.random() for index in range(100_000)]
    rng.shuffle(values)
    windows = tumbling()
    for index, value in enumerate(values):
        windows.add(index // 2, value, now_wall_ms=0)

    (closed,) = windows.close_idle(now_wall_ms=120_000)

    ordered = sorted(values)
    assert closed.count == 100_000
    assert closed.sum == math.fsum(values)
    assert (closed.min, closed.max) == (ordered[0], ordered[-1])
    assert not closed.complete
    # The sketch compacts at random: allow its own bound (99% confidence), twice.
    bound = 2 * kll_doubles_sketch.get_normalized_rank_error(SKETCH_K, False)
    for estimate, q in ((closed.p50, 0.5), (closed.p95, 0.95), (closed.p99, 0.99)):
        rank = sum(1 for v in ordered if v <= estimate) / len(ordered)
        assert abs(rank - q) < bound, (q, estimate, rank)


def test_state_of_a_busy_series_stays_bounded() -> None:
    """A device sending 1,000 readings/s: the state stops growing past its bound."""
    windows = tumbling(lateness_ms=5_000)
    sizes = []
    for second in range(50):
        for milli in range(1_000):
            windows.add(second * 1_000 + milli, float(milli % 97), now_wall_ms=0)
        sizes.append(len(windows.to_bytes()))

    assert max(sizes) < 3_600
    assert sizes[-1] - sizes[10] < 400


def test_sum_is_exact_whatever_the_arrival_order_past_the_kept_bound() -> None:
    values = [1e16, 1.0, -1e16, 0.1, 0.2, 0.3] * 50
    forward, backward = (
        tumbling(kept_readings_per_pane=4),
        tumbling(kept_readings_per_pane=4),
    )
    for index, value in enumerate(values):
        forward.add(index, value, now_wall_ms=0)
    for index, value in reversed(list(enumerate(values))):
        backward.add(index, value, now_wall_ms=0)

    (one,) = forward.close_idle(now_wall_ms=120_000)
    (other,) = backward.close_idle(now_wall_ms=120_000)

    assert one.sum == other.sum == math.fsum(values)


def test_spilled_state_round_trip_keeps_exact_aggregates() -> None:
    """KLL compacts at random, so only its estimates may differ after a restore."""
    spec = WindowSpec(size_ms=MINUTE_MS, idle_timeout_ms=120_000, step_ms=20_000)
    straight, restored = SeriesWindows(spec), SeriesWindows(spec)
    one: list[ClosedWindow] = []
    other: list[ClosedWindow] = []
    for time_ms in range(0, 90_000, 50):
        value = float(time_ms % 1_013)
        one.extend(straight.add(time_ms, value, now_wall_ms=0).closed)
        other.extend(restored.add(time_ms, value, now_wall_ms=0).closed)
        if time_ms == 45_000:
            restored = SeriesWindows.from_bytes(restored.to_bytes(), spec)
    one.extend(straight.close_idle(200_000))
    other.extend(restored.close_idle(200_000))

    assert len(one) == len(other) == 7
    for a, b in zip(one, other, strict=True):
        exact = ("window_start_ms", "count", "sum", "min", "max", "last", "complete")
        assert [getattr(a, f) for f in exact] == [getattr(b, f) for f in exact]
        assert abs(a.p50 - b.p50) < 0.05 * 1_013


def test_summarize_builds_the_window_summary_record() -> None:
    windows = tumbling()
    windows.add(1_000, 2.0, now_wall_ms=0)
    windows.add(2_000, 4.0, now_wall_ms=0)
    (closed,) = windows.close_idle(now_wall_ms=200_000)

    summary = summarize(closed, "press-7", "temperature", "Cel")

    assert summary == WindowSummary(
        device_id="press-7",
        metric="temperature",
        window_start_ms=0,
        window_end_ms=60_000,
        count=2,
        sum=6.0,
        min=2.0,
        max=4.0,
        mean=3.0,
        last=4.0,
        p50=3.0,
        p95=3.9,
        p99=3.98,
        kind="tumbling",
        unit="Cel",
        closed_by="idle",
    )


def test_state_of_one_minute_of_one_hertz_readings_is_797_bytes() -> None:
    windows = tumbling(lateness_ms=5_000)
    for second in range(60):
        windows.add(1_714_564_800_000 + second * 1000, 20.0 + second, now_wall_ms=0)

    state = windows.to_bytes()

    assert len(state) == 797
    assert SeriesWindows.from_bytes(state, windows.spec).to_bytes() == state


@pytest.mark.parametrize(
    "other",
    [
        WindowSpec(size_ms=30_000, idle_timeout_ms=1),
        WindowSpec(size_ms=60_000, step_ms=30_000, idle_timeout_ms=1),
    ],
)
def test_state_written_with_another_size_or_step_is_refused(other: WindowSpec) -> None:
    windows = tumbling()
    windows.add(1_000, 1.0, now_wall_ms=0)

    with pytest.raises(ValueError, match="window state must match size_ms="):
        SeriesWindows.from_bytes(windows.to_bytes(), other)


@pytest.mark.parametrize("cut", [1, 10, 50, 60])
def test_corrupt_state_raises_value_error(cut: int) -> None:
    windows = tumbling()
    windows.add(1_000, 1.0, now_wall_ms=0)
    state = windows.to_bytes()

    with pytest.raises(ValueError, match="window state must be"):
        SeriesWindows.from_bytes(state[:cut], windows.spec)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"size_ms": 0}, "size_ms must be positive, got 0"),
        ({"step_ms": 0}, "step_ms must be in 1..size_ms, got 0"),
        ({"step_ms": 70_000}, "step_ms must be in 1..size_ms, got 70000"),
        ({"step_ms": 7_000}, "step_ms must divide size_ms=60000, got 7000"),
        ({"allowed_lateness_ms": -1}, "allowed_lateness_ms must be >= 0, got -1"),
        ({"idle_timeout_ms": 0}, "idle_timeout_ms must be positive, got 0"),
        ({"kept_readings_per_pane": 0}, "must be positive, got 0"),
        ({"step_ms": 60}, r"\(allowed_lateness_ms \+ size_ms\) / step_ms must be"),
    ],
)
def test_invalid_spec_names_the_setting(options: dict[str, int], message: str) -> None:
    settings = {"size_ms": 60_000, "idle_timeout_ms": 1, **options}

    with pytest.raises(ValueError, match=message):
        WindowSpec(**settings)


# -- randomized comparison against a naive reference -----------------------------

SERIES = ("a", "b", "c", "d")
LATENESS_MS = 10_000


def _stream(seed: int) -> list[tuple[str, int, float]]:
    """Readings of several series: 5% redelivered, 5% moved up to 9 s later."""
    rng = random.Random(seed)
    per_series: dict[str, list[tuple[int, float]]] = {}
    for name in SERIES:
        time_ms = 1_714_564_800_000 + rng.randrange(60_000)
        readings = []
        for _ in range(400):
            time_ms += rng.randrange(1, 3_000)
            readings.append(
                (time_ms, round(rng.gauss(50.0, 20.0), rng.randrange(1, 6)))
            )
        per_series[name] = readings
    arrivals: dict[str, list[tuple[int, float]]] = {}
    for name, readings in per_series.items():
        order = list(readings)
        for index in range(len(order) - 3):
            if rng.random() < 0.05:
                # Moved at most 3 places, under 9 s: within the lateness.
                order.insert(index + rng.randrange(1, 4), order.pop(index))
        for index in range(len(order) - 1, 0, -1):
            if rng.random() < 0.05:
                order.insert(index + rng.randrange(0, 2), order[index])
        arrivals[name] = order
    stream = []
    while any(arrivals.values()):
        name = rng.choice([n for n in SERIES if arrivals[n]])
        time_ms, value = arrivals[name].pop(0)
        stream.append((name, time_ms, value))
    return stream


Stats = tuple[int, float, float, float, float, float, float, float, float]


def _quantile(ordered: list[float], q: float) -> float:
    position = (len(ordered) - 1) * q
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def _reference(stream: list[tuple[str, int, float]]) -> dict[tuple[str, int], Stats]:
    windows: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for name, time_ms, value in stream:
        windows[name, time_ms - time_ms % MINUTE_MS][time_ms] = value
    expected = {}
    for key, readings in windows.items():
        values = sorted(readings.values())
        total = math.fsum(values)
        last = readings[max(readings)]
        quantiles = [_quantile(values, q) for q in (0.5, 0.95, 0.99)]
        count = len(values)
        expected[key] = (
            count,
            total,
            values[0],
            values[-1],
            total / count,
            last,
            *quantiles,
        )
    return expected


def _run(
    stream: list[tuple[str, int, float]], restore_at: int | None
) -> dict[tuple[str, int], WindowSummary]:
    spec = WindowSpec(
        size_ms=MINUTE_MS, idle_timeout_ms=300_000, allowed_lateness_ms=LATENESS_MS
    )
    table = {name: SeriesWindows(spec) for name in SERIES}
    summaries: dict[tuple[str, int], WindowSummary] = {}

    def emit(name: str, closed: tuple[ClosedWindow, ...]) -> None:
        for window in closed:
            key = (name, window.window_start_ms)
            assert key not in summaries, "window emitted twice"
            summaries[key] = summarize(window, name, "temperature", None)

    for index, (name, time_ms, value) in enumerate(stream):
        if index == restore_at:
            table = {
                n: SeriesWindows.from_bytes(w.to_bytes(), spec)
                for n, w in table.items()
            }
        result = table[name].add(time_ms, value, now_wall_ms=index)
        assert not result.late
        emit(name, result.closed)
    for name, windows in table.items():
        emit(name, windows.close_idle(now_wall_ms=len(stream) + 300_000))
    return summaries


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_summaries_match_a_naive_reference_with_duplicates_and_disorder(
    seed: int,
) -> None:
    stream = _stream(seed)

    summaries = _run(stream, restore_at=None)

    expected = _reference(stream)
    assert set(summaries) == set(expected)
    for key, summary in summaries.items():
        got = (
            summary.count, summary.sum, summary.min, summary.max, summary.mean,
            summary.last, summary.p50, summary.p95, summary.p99,
        )  # fmt: skip
        assert got == expected[key], key


def test_state_round_trip_mid_stream_continues_identically() -> None:
    stream = _stream(seed=4)

    uninterrupted = _run(stream, restore_at=None)
    restored = _run(stream, restore_at=len(stream) // 2)

    assert restored == uninterrupted
