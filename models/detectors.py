"""Online anomaly detectors for one series each: build, score then learn, checkpoint.

A detector sees the readings of one series once, in order. For each reading it
first scores it against what it has learnt so far, then learns it. The worker keeps
one detector per series and checkpoints ``to_bytes()`` into a Faust table, so state
must stay small (at most 2 KiB) and a restored detector must continue exactly where
the saved one stopped.

Detectors are built from a :class:`DetectorSpec` (a frozen config object) by
:func:`build_detector`, through the :data:`DETECTORS` registry, so each metric can
name its own detector.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from river import proba

# A score at or above this is an anomaly for the default detector; chosen on NAB
# (see docs/BENCHMARKS.md) and used as the default of alerting rules.
DEFAULT_THRESHOLD = 0.8

# Tail probabilities are floored at 1e-10 and mapped to [0, 1] by their logarithm:
# a probability of 1e-10 (or smaller) scores 1, a probability of 1 scores 0.
_LOG_FLOOR = math.log(1e-10)
_SQRT2 = math.sqrt(2.0)


class Detector(Protocol):
    """What the worker needs from a detector of one series.

    Not thread-safe; a detector belongs to one series and one task.
    """

    grace_period: int

    def score_one(self, value: float, time_ms: int) -> float:
        """Score a reading without learning it: in [0, 1], higher is stranger."""
        ...

    def learn_one(self, value: float, time_ms: int) -> None:
        """Learn a reading; the next score takes it into account."""
        ...

    def score_then_learn(self, value: float, time_ms: int) -> float:
        """Score a reading, then learn it; returns the score."""
        ...

    def to_bytes(self) -> bytes:
        """Serialise the learnt state (not the parameters) compactly."""
        ...


@dataclass(frozen=True)
class DetectorSpec:
    """Configuration of a detector: which one, its parameters and its seed.

    Attributes:
        name: A key of :data:`DETECTORS`, for example ``"surprise"``.
        params: Keyword parameters of that detector; missing ones take defaults.
        seed: Seed of any random source; deterministic detectors ignore it.
    """

    name: str = "surprise"
    params: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0


def _tail_score(z: float) -> float:
    """Map an absolute z-score to [0, 1] by the log of its two-sided tail."""
    tail = math.erfc(z / _SQRT2)
    if tail <= 1e-10:
        return 1.0
    return math.log(tail) / _LOG_FLOOR


class SurpriseDetector:
    """Anomaly likelihood of value and first-difference surprise (the default).

    Each reading gets a raw surprise: the larger of two z-scores, one of the value
    against an exponentially weighted mean and variance of past values, one of the
    change since the previous reading against the same statistics of past changes.
    The z-score becomes a log-scaled tail probability in [0, 1]. As in Numenta's
    anomaly likelihood, the anomaly score is not that raw surprise but how unusual
    its short-term average is against its long-term distribution, again as a
    log-scaled tail probability. A single noisy reading therefore scores little;
    a run of surprising readings, or one extreme reading, scores high.

    Once a score reaches ``suppress_above``, the next ``suppress_readings`` scores
    are 0: one incident gives one detection, not a burst. A reading scoring that
    high is not learnt into the value statistics (river's habit of not learning
    from points just flagged); readings during suppression are, so that a lasting
    level shift becomes the new normal.

    The state is ten numbers (73 bytes serialised), and a reading costs a few
    microseconds in CPython.

    Known limits: it models neither seasonality nor trend, so an anomaly that is
    only abnormal for its time of day goes unseen; slow drifts are learnt, not
    flagged; the statistics assume one reading per step and ignore ``time_ms``, so
    irregular sampling shows up as surprise in the changes.

    Args:
        grace_period: Readings scored 0 while the statistics settle.
        value_fading: Weight of the newest reading in the value and change
            statistics (0.01: a memory of about 100 readings).
        short_fading: Weight of the newest raw surprise in its short-term average
            (0.8: high enough that a lone spike is flagged on its own reading).
        long_fading: Weight of the newest raw surprise in its long-term mean and
            variance (0.001: a memory of about 1,000 readings).
        suppress_above: Score at which a detection silences the next ones; the
            same as :data:`DEFAULT_THRESHOLD`.
        suppress_readings: How many readings stay silent after such a detection.
    """

    # Version byte, two counters, eight floats; little-endian to move across hosts.
    _STATE = struct.Struct("<BII8d")
    _VERSION = 1

    def __init__(
        self,
        grace_period: int = 150,
        value_fading: float = 0.01,
        short_fading: float = 0.8,
        long_fading: float = 0.001,
        suppress_above: float = 0.8,
        suppress_readings: int = 300,
    ) -> None:
        self.grace_period = int(grace_period)
        self.value_fading = value_fading
        self.short_fading = short_fading
        self.long_fading = long_fading
        self.suppress_above = suppress_above
        self.suppress_readings = int(suppress_readings)

        self._n_seen = 0
        self._quiet = 0
        self._mean = 0.0
        self._var = 0.0
        self._change_mean = 0.0
        self._change_var = 0.0
        self._previous = 0.0
        self._short = 0.0
        self._long_mean = 0.0
        self._long_var = 0.0

    def _surprise(self, value: float) -> float:
        """Return the raw surprise of a value, in [0, 1]."""
        if self._n_seen == 0:
            return 0.0
        change = value - self._previous
        # Keeps a constant series (variance 0) from dividing by zero.
        tiny = 1e-12 + (1e-9 * self._mean) ** 2
        z_value = abs(value - self._mean) / math.sqrt(self._var + tiny)
        z_change = abs(change - self._change_mean) / math.sqrt(self._change_var + tiny)
        return _tail_score(max(z_value, z_change))

    def _assess(self, value: float) -> tuple[float, float, float]:
        """Return ``(score, raw surprise, new short average)`` without learning."""
        raw = self._surprise(value)
        short = self._short + self.short_fading * (raw - self._short)
        # 1e-6 keeps a never-surprised series from scoring 1 on its first blip.
        spread = math.sqrt(self._long_var) + 1e-6
        tail = 0.5 * math.erfc((short - self._long_mean) / spread / _SQRT2)
        score = 1.0 if tail <= 1e-10 else max(0.0, math.log(tail) / _LOG_FLOOR)
        if self._n_seen < self.grace_period or self._quiet > 0:
            score = 0.0
        return score, raw, short

    def _update(self, value: float, raw: float, short: float, score: float) -> None:
        flagged = score >= self.suppress_above
        if self._quiet > 0:
            self._quiet -= 1
        if flagged:
            self._quiet = self.suppress_readings

        fading = self.long_fading
        delta = raw - self._long_mean
        self._long_mean += fading * delta
        self._long_var = (1.0 - fading) * (self._long_var + fading * delta * delta)
        self._short = short

        if self._n_seen == 0:
            self._mean = value
        elif not flagged:
            fading = self.value_fading
            delta = value - self._mean
            self._mean += fading * delta
            self._var = (1.0 - fading) * (self._var + fading * delta * delta)
            change_delta = value - self._previous - self._change_mean
            self._change_mean += fading * change_delta
            self._change_var = (1.0 - fading) * (
                self._change_var + fading * change_delta * change_delta
            )
        self._previous = value
        self._n_seen += 1

    def score_one(self, value: float, time_ms: int) -> float:
        """Score a reading against the learnt state, without changing it.

        Args:
            value: The reading's value; must be finite.
            time_ms: Event time in epoch milliseconds; not used.

        Returns:
            The anomaly score in [0, 1]; 0 during the grace period.
        """
        return self._assess(value)[0]

    def learn_one(self, value: float, time_ms: int) -> None:
        """Learn a reading (scoring it first, to know whether it was flagged).

        Args:
            value: The reading's value; must be finite.
            time_ms: Event time in epoch milliseconds; not used.
        """
        score, raw, short = self._assess(value)
        self._update(value, raw, short, score)

    def score_then_learn(self, value: float, time_ms: int) -> float:
        """Score a reading, then learn it, at the cost of one assessment.

        Args:
            value: The reading's value; must be finite.
            time_ms: Event time in epoch milliseconds; not used.

        Returns:
            The score the reading had before it was learnt.
        """
        score, raw, short = self._assess(value)
        self._update(value, raw, short, score)
        return score

    def to_bytes(self) -> bytes:
        """Serialise the learnt state in 73 bytes; parameters are not included."""
        return self._STATE.pack(
            self._VERSION,
            self._n_seen,
            self._quiet,
            self._mean,
            self._var,
            self._change_mean,
            self._change_var,
            self._previous,
            self._short,
            self._long_mean,
            self._long_var,
        )

    @classmethod
    def from_bytes(cls, data: bytes, **params: float) -> SurpriseDetector:
        """Rebuild a detector from :meth:`to_bytes` output and its parameters.

        Raises:
            ValueError: When ``data`` is not a state of this detector's version.
        """
        if len(data) != cls._STATE.size or data[0] != cls._VERSION:
            message = (
                f"surprise detector state must be {cls._STATE.size} bytes of "
                f"version {cls._VERSION} (got {len(data)} bytes)"
            )
            raise ValueError(message)
        fields = cls._STATE.unpack(data)
        detector = cls(**params)  # type: ignore[arg-type]
        detector._n_seen, detector._quiet = fields[1], fields[2]
        (
            detector._mean,
            detector._var,
            detector._change_mean,
            detector._change_var,
            detector._previous,
            detector._short,
            detector._long_mean,
            detector._long_var,
        ) = fields[3:]
        return detector


class GaussianDetector:
    """Two-sided Gaussian tail of each value, over all values seen (river's way).

    Wraps :class:`river.proba.Gaussian` and scores like
    :class:`river.anomaly.GaussianScorer`: ``2 * |cdf(value) - 0.5|``. Its memory
    never fades, so after a level shift it keeps flagging for a long time, and on
    long series it grows blind to change. Useful for stable, unimodal metrics.

    Args:
        grace_period: Readings scored 0 before the estimate is trusted.
    """

    _STATE = struct.Struct("<B3d")
    _VERSION = 1

    def __init__(self, grace_period: int = 100) -> None:
        self.grace_period = int(grace_period)
        self._gaussian = proba.Gaussian()  # type: ignore[no-untyped-call]

    def score_one(self, value: float, time_ms: int) -> float:
        """Score a value by its two-sided tail; 0 during the grace period.

        Args:
            value: The reading's value; must be finite.
            time_ms: Event time in epoch milliseconds; not used.

        Returns:
            The anomaly score in [0, 1].
        """
        if self._gaussian.n_samples < self.grace_period:
            return 0.0
        score = 2.0 * abs(float(self._gaussian.cdf(value)) - 0.5)
        return min(1.0, score)

    def learn_one(self, value: float, time_ms: int) -> None:
        """Add a value to the Gaussian estimate.

        Args:
            value: The reading's value; must be finite.
            time_ms: Event time in epoch milliseconds; not used.
        """
        self._gaussian.update(value)  # type: ignore[no-untyped-call]

    def score_then_learn(self, value: float, time_ms: int) -> float:
        """Score a value, then learn it; returns the score."""
        score = self.score_one(value, time_ms)
        self.learn_one(value, time_ms)
        return score

    def to_bytes(self) -> bytes:
        """Serialise count, mean and sum of squared deviations in 25 bytes."""
        # Welford's own sums, not the variance, so a restore is bit-identical.
        welford = self._gaussian._var
        count = float(welford.mean.n)
        mean = float(welford.mean._mean)
        return self._STATE.pack(self._VERSION, count, mean, float(welford._S))

    @classmethod
    def from_bytes(cls, data: bytes, **params: float) -> GaussianDetector:
        """Rebuild a detector from :meth:`to_bytes` output and its parameters.

        Raises:
            ValueError: When ``data`` is not a state of this detector's version.
        """
        if len(data) != cls._STATE.size or data[0] != cls._VERSION:
            message = (
                f"gaussian detector state must be {cls._STATE.size} bytes of "
                f"version {cls._VERSION} (got {len(data)} bytes)"
            )
            raise ValueError(message)
        _, count, mean, sum_squares = cls._STATE.unpack(data)
        detector = cls(**params)  # type: ignore[arg-type]
        welford = detector._gaussian._var
        welford.mean.n = count
        welford.mean._mean = mean
        welford._S = sum_squares
        return detector


@dataclass(frozen=True)
class DetectorKind:
    """How to build a detector and how to restore it from its state.

    Attributes:
        build: Builds a fresh detector from keyword parameters.
        restore: Rebuilds a detector from its state bytes and parameters.
    """

    build: Callable[..., Detector]
    restore: Callable[..., Detector]


DETECTORS: dict[str, DetectorKind] = {
    "surprise": DetectorKind(SurpriseDetector, SurpriseDetector.from_bytes),
    "gaussian": DetectorKind(GaussianDetector, GaussianDetector.from_bytes),
}


def _kind(spec: DetectorSpec) -> DetectorKind:
    kind = DETECTORS.get(spec.name)
    if kind is None:
        names = ", ".join(sorted(DETECTORS))
        message = f"detector name must be one of {names} (got {spec.name!r})"
        raise ValueError(message)
    return kind


def build_detector(spec: DetectorSpec) -> Detector:
    """Build a fresh detector from its spec.

    Args:
        spec: Which detector, with which parameters.

    Returns:
        A detector that has learnt nothing.

    Raises:
        ValueError: When the name is not registered.
        TypeError: When a parameter is not one the detector takes.

    >>> detector = build_detector(DetectorSpec("surprise"))
    >>> detector.score_then_learn(1.0, 0)
    0.0
    """
    return _kind(spec).build(**spec.params)


def restore_detector(spec: DetectorSpec, data: bytes) -> Detector:
    """Rebuild a detector from its spec and a checkpoint of its state.

    Args:
        spec: The spec the checkpointed detector was built from.
        data: Output of that detector's ``to_bytes()``.

    Returns:
        A detector that continues exactly where the checkpointed one stopped.

    Raises:
        ValueError: When the name is not registered or ``data`` is not a state
            of that detector.
    """
    return _kind(spec).restore(data, **spec.params)
