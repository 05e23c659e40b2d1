"""Tests of the bridge's idle tick schedule."""

from __future__ import annotations

from connectors.mqtt import IdleTickSchedule


def test_first_tick_goes_after_the_idle_timeout() -> None:
    ticks = IdleTickSchedule(idle_ms=30_000, horizon_ms=70_000)
    ticks.seen("press-1", received_ms=1_000)

    assert ticks.due(30_999) == []
    assert ticks.due(31_000) == ["press-1"]


def test_ticks_repeat_until_no_window_can_be_open() -> None:
    """Ticks every idle timeout until the horizon has passed since the record."""
    ticks = IdleTickSchedule(idle_ms=30_000, horizon_ms=70_000)
    ticks.seen("press-1", received_ms=0)

    sent = [now_ms for now_ms in range(0, 300_000, 1_000) if ticks.due(now_ms)]

    assert sent == [30_000, 60_000, 90_000]
    assert len(ticks) == 0


def test_long_windows_tick_every_tenth_of_the_horizon() -> None:
    ticks = IdleTickSchedule(idle_ms=30_000, horizon_ms=3_600_000)
    ticks.seen("press-1", received_ms=0)

    sent = [now_ms for now_ms in range(0, 5_000_000, 1_000) if ticks.due(now_ms)]

    assert ticks.every_ms == 360_000
    assert sent[:3] == [30_000, 390_000, 750_000]
    assert sent[-1] == 3_630_000 and len(sent) == 11


def test_a_new_record_starts_the_schedule_over() -> None:
    ticks = IdleTickSchedule(idle_ms=30_000, horizon_ms=70_000)
    ticks.seen("press-1", received_ms=0)
    ticks.seen("press-2", received_ms=0)

    first = ticks.due(30_000)
    ticks.seen("press-1", received_ms=45_000)

    assert first == ["press-1", "press-2"]
    assert ticks.due(60_000) == ["press-2"]
    assert ticks.due(75_000) == ["press-1"]


def test_a_reconnect_postpones_the_ticks_by_the_idle_timeout() -> None:
    """Messages queued at the broker while the bridge was away come first."""
    ticks = IdleTickSchedule(idle_ms=30_000, horizon_ms=70_000)
    ticks.seen("press-1", received_ms=0)

    ticks.postpone(25_000)

    assert ticks.due(30_000) == []
    assert ticks.due(55_000) == ["press-1"]


def test_a_device_due_earlier_than_the_others_is_not_missed() -> None:
    ticks = IdleTickSchedule(idle_ms=30_000, horizon_ms=70_000)
    ticks.seen("late", received_ms=100_000)
    assert ticks.due(50_000) == []

    ticks.seen("early", received_ms=40_000)

    assert ticks.due(70_000) == ["early"]
    assert ticks.due(130_000) == ["late", "early"]
