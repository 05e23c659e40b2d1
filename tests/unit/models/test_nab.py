import math

import pytest

from models.nab import PROFILES, LabelledSeries, raw_score, scaled_sigmoid, score_corpus

STANDARD = PROFILES["standard"]


def _series(scores: list[float]) -> list[LabelledSeries]:
    # 100 rows: probation is rows 0-14; one window, rows 40-49.
    return [LabelledSeries("s", scores, [(40, 49)])]


def test_perfect_detector_scores_100() -> None:
    scores = [0.0] * 100
    scores[40] = 1.0

    result = score_corpus(_series(scores), STANDARD)

    assert result.score == 100.0
    assert (result.null, result.perfect, result.threshold) == (-1.0, 1.0, 1.0)


def test_null_detector_scores_0() -> None:
    result = score_corpus(_series([0.0] * 100), STANDARD)

    assert result.score == 0.0
    assert result.threshold == math.inf


def test_one_false_positive_costs_fp_weight_when_no_window_precedes() -> None:
    scores = [0.0] * 100
    scores[40] = 1.0
    scores[20] = 1.0

    raw = raw_score(_series(scores), STANDARD, 1.0)

    assert raw == pytest.approx(1.0 - 0.11, abs=1e-12)


def test_false_positive_just_after_window_costs_less() -> None:
    scores = [0.0] * 100
    scores[40] = 1.0
    scores[50] = 1.0  # one row past the window's last row, width 10

    raw = raw_score(_series(scores), STANDARD, 1.0)

    expected = 1.0 + 0.11 * (2.0 / (1.0 + math.exp(5.0 / 9.0)) - 1.0)
    assert raw == pytest.approx(expected, abs=1e-12)


def test_only_earliest_detection_in_window_counts() -> None:
    scores = [0.0] * 100
    scores[45] = 1.0
    scores[46] = 1.0

    raw = raw_score(_series(scores), STANDARD, 1.0)

    assert raw == pytest.approx(scaled_sigmoid(-0.5) / scaled_sigmoid(-1.0))


def test_detection_in_probation_is_ignored() -> None:
    scores = [0.0] * 100
    scores[3] = 1.0

    assert raw_score(_series(scores), STANDARD, 1.0) == -1.0


def test_missed_window_costs_fn_weight_of_profile() -> None:
    result = score_corpus(_series([0.0] * 100), PROFILES["reward_low_FN_rate"])

    assert result.null == -2.0
