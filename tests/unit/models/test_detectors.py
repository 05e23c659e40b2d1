import math

import pytest

from models.detectors import (
    DEFAULT_THRESHOLD,
    DETECTORS,
    DetectorSpec,
    build_detector,
    restore_detector,
)

NAMES = sorted(DETECTORS)


def _readings(n: int) -> list[float]:
    return [10.0 + math.sin(i / 3.0) + 0.1 * ((i * 7919) % 13) for i in range(n)]


@pytest.mark.parametrize("name", NAMES)
def test_detector_scores_stay_in_unit_interval(name: str) -> None:
    detector = build_detector(DetectorSpec(name, seed=1))
    values = _readings(400) + [1e6, -1e6, 0.0, 10.0]

    scores = [detector.score_then_learn(v, i) for i, v in enumerate(values)]

    assert all(0.0 <= s <= 1.0 for s in scores)


@pytest.mark.parametrize("name", NAMES)
def test_detector_scores_before_learning(name: str) -> None:
    """score_then_learn returns what score_one said, and score_one learns nothing."""
    detector = build_detector(DetectorSpec(name, seed=1))
    for i, value in enumerate(_readings(300)):
        detector.learn_one(value, i)
    state = detector.to_bytes()

    first = detector.score_one(25.0, 300)
    second = detector.score_one(25.0, 300)
    unchanged = detector.to_bytes()
    combined = detector.score_then_learn(25.0, 300)

    assert first == second == combined
    assert unchanged == state
    assert detector.to_bytes() != state


@pytest.mark.parametrize("name", NAMES)
def test_detector_is_deterministic_with_seed(name: str) -> None:
    values = _readings(500)
    runs = []
    for _ in range(2):
        detector = build_detector(DetectorSpec(name, seed=7))
        runs.append([detector.score_then_learn(v, i) for i, v in enumerate(values)])

    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", NAMES)
def test_restored_detector_continues_identically(name: str) -> None:
    spec = DetectorSpec(name, seed=3)
    values = _readings(600)
    detector = build_detector(spec)
    for i, value in enumerate(values[:300]):
        detector.score_then_learn(value, i)

    restored = restore_detector(spec, detector.to_bytes())
    tail = list(enumerate(values[300:], start=300))
    expected = [detector.score_then_learn(v, i) for i, v in tail]
    got = [restored.score_then_learn(v, i) for i, v in tail]

    assert got == expected
    assert restored.to_bytes() == detector.to_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_detector_state_fits_in_two_kib(name: str) -> None:
    detector = build_detector(DetectorSpec(name))
    for i, value in enumerate(_readings(1000)):
        detector.score_then_learn(value, i)

    assert len(detector.to_bytes()) <= 2048


@pytest.mark.parametrize("name", NAMES)
def test_detector_scores_zero_during_grace_period(name: str) -> None:
    detector = build_detector(DetectorSpec(name, params={"grace_period": 50}))
    values = [1.0, 1e9, -1e9] * 20

    scores = [detector.score_then_learn(v, i) for i, v in enumerate(values)]

    assert detector.grace_period == 50
    assert scores[:50] == [0.0] * 50
    assert max(scores[50:]) > 0.0


@pytest.mark.parametrize("name", NAMES)
def test_detector_is_warm_once_it_learnt_grace_period_readings(name: str) -> None:
    detector = build_detector(DetectorSpec(name, params={"grace_period": 50}))

    warm = []
    for i in range(60):
        warm.append(detector.warm)
        detector.score_then_learn(float(i % 7), i)

    assert warm == [False] * 50 + [True] * 10


def test_default_detector_flags_spike_at_the_spike() -> None:
    detector = build_detector(DetectorSpec())
    values = _readings(500)
    values[400] = 30.0

    scores = [detector.score_then_learn(v, i) for i, v in enumerate(values)]

    assert scores[400] >= DEFAULT_THRESHOLD
    assert max(scores[:400]) < DEFAULT_THRESHOLD


def test_default_detector_silences_repeats_after_a_detection() -> None:
    detector = build_detector(DetectorSpec(params={"suppress_readings": 10}))
    values = _readings(500)
    values[400] = 30.0

    scores = [detector.score_then_learn(v, i) for i, v in enumerate(values)]

    assert scores[401:411] == [0.0] * 10


def test_default_detector_silences_echoes_of_a_weaker_detection() -> None:
    params = {"suppress_above": 1.01, "echo_readings": 5}
    detector = build_detector(DetectorSpec(params=params))
    values = _readings(500)
    values[400] = 30.0

    scores = [detector.score_then_learn(v, i) for i, v in enumerate(values)]

    assert scores[400] >= 0.5
    assert scores[401:406] == [0.0] * 5


def test_default_detector_flags_fewer_repeats_of_a_familiar_jump() -> None:
    """A square wave's jumps recur in the same contexts, so the gate damps them."""
    values = [10.0 * ((i // 40) % 2) + 0.1 * ((i * 7919) % 13) for i in range(1200)]
    counts = []
    for floor in (1.0, 0.3):
        spec = DetectorSpec(params={"novelty_floor": floor})
        detector = build_detector(spec)
        scores = [detector.score_then_learn(v, i) for i, v in enumerate(values)]
        counts.append(sum(score >= DEFAULT_THRESHOLD for score in scores))

    ungated, gated = counts

    assert gated < ungated


def _daily_square_wave(days: int) -> list[tuple[int, float]]:
    """Readings every 5 minutes: 80 by day, 20 by night, a little noise."""
    step_ms = 300_000
    readings = []
    for i in range(days * 288):
        level = 80.0 if 72 <= i % 288 < 216 else 20.0
        readings.append((i * step_ms, level + 0.5 * ((i * 7919) % 13)))
    return readings


def test_default_detector_flags_fewer_daily_jumps_with_time_of_day_profile() -> None:
    """A jump that happens at the same time each day is learnt as expected."""
    readings = _daily_square_wave(14)
    counts = []
    for ready in (10**9, 288):
        spec = DetectorSpec(params={"season_ready": ready})
        detector = build_detector(spec)
        scores = [detector.score_then_learn(v, t) for t, v in readings]
        counts.append(sum(score >= DEFAULT_THRESHOLD for score in scores))

    without_profile, with_profile = counts

    assert with_profile < without_profile


def test_default_detector_flags_a_jump_at_an_unusual_time_of_day() -> None:
    readings = _daily_square_wave(10)
    detector = build_detector(DetectorSpec())
    for t, v in readings:
        detector.score_then_learn(v, t)
    night_ms = readings[-1][0] + 300_000

    score = detector.score_one(80.0, night_ms)

    assert score >= DEFAULT_THRESHOLD


def test_default_detector_restored_mid_day_continues_identically() -> None:
    """The time-of-day profile and residual statistics survive a checkpoint."""
    readings = _daily_square_wave(6)
    detector = build_detector(DetectorSpec())
    for t, v in readings[:1000]:
        detector.score_then_learn(v, t)

    restored = restore_detector(DetectorSpec(), detector.to_bytes())
    expected = [detector.score_then_learn(v, t) for t, v in readings[1000:]]
    got = [restored.score_then_learn(v, t) for t, v in readings[1000:]]

    assert got == expected
    assert restored.to_bytes() == detector.to_bytes()


def test_default_detector_state_is_1863_bytes() -> None:
    assert len(build_detector(DetectorSpec()).to_bytes()) == 1863


def test_default_detector_rejects_state_of_another_table_size() -> None:
    spec = DetectorSpec(params={"context_slots": 512})
    state = build_detector(spec).to_bytes()

    with pytest.raises(ValueError, match="got 839 bytes"):
        restore_detector(DetectorSpec(), state)


def test_default_detector_rejects_more_than_64_bins() -> None:
    with pytest.raises(ValueError, match="got 65"):
        build_detector(DetectorSpec(params={"context_bins": 65}))


def test_build_detector_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="got 'nope'"):
        build_detector(DetectorSpec("nope"))


def test_restore_detector_rejects_foreign_state() -> None:
    state = build_detector(DetectorSpec("gaussian")).to_bytes()

    with pytest.raises(ValueError, match="got 25 bytes"):
        restore_detector(DetectorSpec("surprise"), state)
