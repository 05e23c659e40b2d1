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
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from river import proba

# A score at or above this is an anomaly for the default detector; chosen on NAB
# (see docs/BENCHMARKS.md) and used as the default of alerting rules.
DEFAULT_THRESHOLD = 0.4998

# Tail probabilities are floored at 1e-10 and mapped to [0, 1] by their logarithm:
# a probability of 1e-10 (or smaller) scores 1, a probability of 1 scores 0.
_LOG_FLOOR = math.log(1e-10)
_SQRT2 = math.sqrt(2.0)

# Saturating increment of a one-byte context counter, as a lookup table.
_INCREMENT = bytes(min(255, count + 1) for count in range(256))
# Multiplicative hashing constant (Knuth's 2**32 / golden ratio), spreads contexts.
_HASH_MULTIPLIER = 2654435761
# Base of the polynomial that folds a sequence of bins into one integer.
_HASH_BASE = 131
# History byte meaning "no bin yet" (bins are capped at 64, see SurpriseDetector).
_NO_BIN = 255
_DAY_MS = 86_400_000


class Detector(Protocol):
    """What the worker needs from a detector of one series.

    Not thread-safe; a detector belongs to one series and one task.
    """

    grace_period: int

    @property
    def warm(self) -> bool:
        """Return whether the next score counts: ``grace_period`` readings learnt.

        Before that every score is 0, which means "no score yet", not "normal".
        """
        ...

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


class _Assessment(NamedTuple):
    """What :class:`SurpriseDetector` worked out about a reading, to learn it."""

    raw: float
    short: float
    low: float
    high: float
    value_bin: int
    keys: tuple[int, ...]
    slot: int
    residual: float


class SurpriseDetector:
    """Anomaly likelihood of value and change surprise, gated by context novelty.

    Each reading gets a raw surprise: the larger of two z-scores, one of the value
    against an exponentially weighted mean and variance of past values, one of the
    change since the previous reading against the same statistics of past changes.
    A change counts only as far as the reading is also off its time-of-day profile:
    ``season_slots`` slots of the UTC day each hold a fading mean of the values seen
    in them, and the residual against that mean (and its change since the previous
    reading) is compared with the usual residuals. So a jump that happens every day
    at the same hour stops being a surprise after a few days, while the same jump
    at another hour still is. The z-score becomes a log-scaled tail probability in
    [0, 1]. As in Numenta's
    anomaly likelihood, what counts is not that raw surprise but how unusual its
    short-term average is against its long-term distribution, again as a
    log-scaled tail probability.

    That likelihood is then weighed by how new the reading's context is. The value
    range seen so far is cut into ``context_bins`` bins; the bin of the reading
    together with the bins of the one and of the two readings before it form two
    contexts, hashed into a table of ``context_slots`` one-byte counters. A context
    never seen before keeps the likelihood whole; one seen ``n`` times keeps
    ``novelty_floor`` plus the rest scaled by ``(n + 1) ** -novelty_power``, so a
    context seen once or twice still counts as rather new. When a
    reading falls outside the range, the range grows by ``range_margin`` of its
    width beyond it, so that the bins do not move on every small new extreme.

    Once a score reaches ``suppress_above``, the next ``suppress_readings`` scores
    are 0: one incident gives one detection, not a burst. A weaker score at or
    above ``echo_above`` silences only the next ``echo_readings``. A reading
    scoring ``suppress_above`` or more is not learnt into the value statistics
    (river's habit of not learning from points just flagged); readings during
    suppression are, so that a lasting level shift becomes the new normal.
    Contexts are always learnt.

    The state is 1,863 bytes serialised with the default 1,536 slots and 48 slots
    of the day, and a reading costs about 5 to 9 microseconds in CPython.

    Known limits: only a daily cycle in UTC is modelled (weekly cycles and
    daylight-saving shifts are not); a value normal for another hour is flagged
    through its change, but a slow move to it is not; slow drifts are learnt, not
    flagged; counters never fade, so in a series that visits every context the gate
    stops helping and the score falls back towards ``novelty_floor`` of the
    likelihood; gaps in ``time_ms`` are not seen, so irregular sampling shows up as
    surprise in the changes.

    Args:
        grace_period: Readings scored 0 while the statistics settle.
        value_fading: Weight of the newest reading in the value, change and
            residual statistics (0.01: a memory of about 100 readings).
        short_fading: Weight of the newest raw surprise in its short-term average
            (0.65: high enough that a lone spike is flagged on its own reading).
        long_fading: Weight of the newest raw surprise in its long-term mean and
            variance (0.001: a memory of about 1,000 readings).
        suppress_above: Score at which a detection silences the next ones. Higher
            than :data:`DEFAULT_THRESHOLD` on purpose: only a confident detection
            silences, so a weak one does not hide the real incident just after.
        suppress_readings: How many readings stay silent after such a detection.
        echo_above: Score at which a weaker detection silences the next
            ``echo_readings`` scores, so that its echoes on the next few
            readings are not counted as more detections.
        echo_readings: How many readings stay silent after a weaker detection.
        context_bins: Bins the value range is cut into, at most 64.
        context_slots: One-byte counters of the context table; the state grows
            by one byte per slot.
        novelty_floor: Share of the likelihood kept when every context of the
            reading has been seen before, in [0, 1].
        range_margin: Extra width, as a share of the range, added beyond a
            reading that falls outside the range.
        novelty_power: How fast a context stops counting as new with each time it
            is seen; 0 counts every seen context as fully familiar.
        season_slots: Slots the UTC day is cut into for the time-of-day profile
            (48: half an hour each); the state grows by four bytes per slot.
        season_fading: Weight of the newest reading in its slot's mean (0.3: a
            memory of a few days at one reading per slot and day, less when a
            slot gets several readings a day).
        season_ready: Residuals learnt before the profile is trusted (288: a
            day of readings every five minutes).
    """

    # Slots, not a per-instance dict: the worker holds one detector per series.
    __slots__ = (
        "_change_mean",
        "_change_var",
        "_contexts",
        "_high",
        "_last_bin",
        "_long_mean",
        "_long_var",
        "_low",
        "_mean",
        "_n_residuals",
        "_n_seen",
        "_previous",
        "_previous_residual",
        "_quiet",
        "_residual_change_mean",
        "_residual_change_var",
        "_residual_mean",
        "_residual_var",
        "_season",
        "_second_last_bin",
        "_short",
        "_slot_ms",
        "_var",
        "context_bins",
        "context_slots",
        "echo_above",
        "echo_readings",
        "grace_period",
        "long_fading",
        "novelty_floor",
        "novelty_power",
        "range_margin",
        "season_fading",
        "season_ready",
        "season_slots",
        "short_fading",
        "suppress_above",
        "suppress_readings",
        "value_fading",
    )

    # Version, three counters, fifteen floats, the last two bins; little-endian to
    # move across hosts. The time-of-day profile (single precision) and the context
    # table follow.
    _STATE = struct.Struct("<BIII15dBB")
    _VERSION = 3

    def __init__(
        self,
        grace_period: int = 150,
        value_fading: float = 0.01,
        short_fading: float = 0.65,
        long_fading: float = 0.001,
        suppress_above: float = 0.95,
        suppress_readings: int = 100,
        echo_above: float = 0.5,
        echo_readings: int = 20,
        context_bins: int = 16,
        context_slots: int = 1536,
        novelty_floor: float = 0.4,
        range_margin: float = 0.1,
        novelty_power: float = 0.5,
        season_slots: int = 48,
        season_fading: float = 0.3,
        season_ready: int = 288,
    ) -> None:
        if not 1 <= int(context_bins) <= 64:
            message = f"context_bins must be in 1..64 (got {context_bins})"
            raise ValueError(message)
        self.grace_period = int(grace_period)
        self.value_fading = value_fading
        self.short_fading = short_fading
        self.long_fading = long_fading
        self.suppress_above = suppress_above
        self.suppress_readings = int(suppress_readings)
        self.echo_above = echo_above
        self.echo_readings = int(echo_readings)
        self.context_bins = int(context_bins)
        self.context_slots = int(context_slots)
        self.novelty_floor = novelty_floor
        self.range_margin = range_margin
        self.novelty_power = novelty_power
        self.season_slots = int(season_slots)
        self.season_fading = season_fading
        self.season_ready = int(season_ready)
        self._slot_ms = _DAY_MS // self.season_slots

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
        self._low = 0.0
        self._high = 0.0
        self._last_bin = _NO_BIN
        self._second_last_bin = _NO_BIN
        self._contexts = bytearray(self.context_slots)
        self._n_residuals = 0
        self._residual_mean = 0.0
        self._residual_var = 0.0
        self._residual_change_mean = 0.0
        self._residual_change_var = 0.0
        self._previous_residual = math.nan
        # Single precision keeps the profile small; NaN marks a slot never seen.
        self._season = array("f", [math.nan] * self.season_slots)

    def _surprise(self, value: float, residual: float) -> float:
        """Return the raw surprise of a value, in [0, 1]."""
        if self._n_seen == 0:
            return 0.0
        change = value - self._previous
        # Keeps a constant series (variance 0) from dividing by zero.
        tiny = 1e-12 + (1e-9 * self._mean) ** 2
        z_value = abs(value - self._mean) / math.sqrt(self._var + tiny)
        z_change = abs(change - self._change_mean) / math.sqrt(self._change_var + tiny)
        seasonal = self._n_residuals >= self.season_ready and residual == residual
        if seasonal:
            z_change = min(z_change, self._residual_z(residual, tiny))
        return _tail_score(max(z_value, z_change))

    def _residual_z(self, residual: float, tiny: float) -> float:
        """Return how far a residual, or its change, is from the usual ones."""
        spread = math.sqrt(self._residual_var + tiny)
        z_residual = abs(residual - self._residual_mean) / spread
        previous = self._previous_residual
        if previous != previous:
            return z_residual
        step = residual - previous - self._residual_change_mean
        z_step = abs(step) / math.sqrt(self._residual_change_var + tiny)
        return max(z_residual, z_step)

    def _range(self, value: float) -> tuple[float, float]:
        """Return the value range once ``value`` is in it."""
        if self._n_seen == 0:
            return value, value
        low, high = self._low, self._high
        margin = self.range_margin * (high - low)
        if value < low:
            low = value - margin
        if value > high:
            high = value + margin
        return low, high

    def _context_keys(self, value_bin: int) -> tuple[int, ...]:
        """Return the table slots of the reading's contexts; fewer at the start."""
        if self._last_bin == _NO_BIN:
            return ()
        pair = (_HASH_BASE + self._last_bin) * _HASH_BASE + value_bin
        keys = ((pair * _HASH_MULTIPLIER) % self.context_slots,)
        if self._second_last_bin == _NO_BIN:
            return keys
        triple = 2 * _HASH_BASE + self._second_last_bin
        triple = (triple * _HASH_BASE + self._last_bin) * _HASH_BASE + value_bin
        return (*keys, (triple * _HASH_MULTIPLIER) % self.context_slots)

    def _assess(self, value: float, time_ms: int) -> tuple[float, _Assessment]:
        """Return the score and what learning the reading needs, without learning."""
        slot = time_ms // self._slot_ms % self.season_slots
        expected = self._season[slot]
        # NaN until the slot has seen a reading: no residual yet.
        residual = value - expected if expected == expected else math.nan
        raw = self._surprise(value, residual)
        short = self._short + self.short_fading * (raw - self._short)
        # 1e-6 keeps a never-surprised series from scoring 1 on its first blip.
        spread = math.sqrt(self._long_var) + 1e-6
        tail = 0.5 * math.erfc((short - self._long_mean) / spread / _SQRT2)
        likelihood = 1.0 if tail <= 1e-10 else max(0.0, math.log(tail) / _LOG_FLOOR)

        low, high = self._range(value)
        value_bin = 0
        if high > low:
            value_bin = int((value - low) / (high - low) * self.context_bins)
            value_bin = min(self.context_bins - 1, max(0, value_bin))
        keys = self._context_keys(value_bin)
        contexts = self._contexts
        # Two contexts once warm: three possible weights, 0, 1/2 or 1, of novelty.
        # A context seen n times weighs 1/sqrt(n + 1): new is 1, rare stays high.
        power = self.novelty_power
        novelty = sum((1.0 + contexts[key]) ** -power for key in keys) / 2.0
        floor = self.novelty_floor
        score = likelihood * (floor + (1.0 - floor) * novelty)

        if not self.warm or self._quiet > 0:
            score = 0.0
        assessed = _Assessment(raw, short, low, high, value_bin, keys, slot, residual)
        return score, assessed

    def _update(self, value: float, score: float, assessed: _Assessment) -> None:
        flagged = score >= self.suppress_above
        if self._quiet > 0:
            self._quiet -= 1
        if flagged:
            self._quiet = self.suppress_readings
        elif score >= self.echo_above:
            self._quiet = self.echo_readings

        fading = self.long_fading
        delta = assessed.raw - self._long_mean
        self._long_mean += fading * delta
        self._long_var = (1.0 - fading) * (self._long_var + fading * delta * delta)
        self._short = assessed.short

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

        self._learn_season(value, flagged, assessed)
        contexts = self._contexts
        for key in assessed.keys:
            contexts[key] = _INCREMENT[contexts[key]]
        self._low, self._high = assessed.low, assessed.high
        self._second_last_bin = self._last_bin
        self._last_bin = assessed.value_bin
        self._previous = value
        self._n_seen += 1

    def _learn_season(self, value: float, flagged: bool, assessed: _Assessment) -> None:
        """Move the time-of-day profile and the residual statistics."""
        residual = assessed.residual
        previous = self._previous_residual
        self._previous_residual = residual
        if residual != residual:
            self._season[assessed.slot] = value
            return
        if flagged:
            return

        self._season[assessed.slot] += self.season_fading * residual
        fading = self.value_fading
        if self._n_residuals == 0:
            self._residual_mean = residual
        delta = residual - self._residual_mean
        self._residual_mean += fading * delta
        self._residual_var = (1.0 - fading) * (self._residual_var + fading * delta**2)
        self._n_residuals += 1
        if previous != previous:
            return

        step = residual - previous - self._residual_change_mean
        self._residual_change_mean += fading * step
        self._residual_change_var = (1.0 - fading) * (
            self._residual_change_var + fading * step * step
        )

    @property
    def warm(self) -> bool:
        """Return whether ``grace_period`` readings are learnt, so scores count."""
        return self._n_seen >= self.grace_period

    def score_one(self, value: float, time_ms: int) -> float:
        """Score a reading against the learnt state, without changing it.

        Args:
            value: The reading's value; must be finite.
            time_ms: Event time in epoch milliseconds; places the reading in the
                time-of-day profile.

        Returns:
            The anomaly score in [0, 1]; 0 during the grace period.
        """
        return self._assess(value, time_ms)[0]

    def learn_one(self, value: float, time_ms: int) -> None:
        """Learn a reading (scoring it first, to know whether it was flagged).

        Args:
            value: The reading's value; must be finite.
            time_ms: Event time in epoch milliseconds; places the reading in the
                time-of-day profile.
        """
        score, assessed = self._assess(value, time_ms)
        self._update(value, score, assessed)

    def score_then_learn(self, value: float, time_ms: int) -> float:
        """Score a reading, then learn it, at the cost of one assessment.

        Args:
            value: The reading's value; must be finite.
            time_ms: Event time in epoch milliseconds; places the reading in the
                time-of-day profile.

        Returns:
            The score the reading had before it was learnt.
        """
        score, assessed = self._assess(value, time_ms)
        self._update(value, score, assessed)
        return score

    def to_bytes(self) -> bytes:
        """Serialise the learnt state; 1,863 bytes with the default sizes.

        Parameters are not included: restore with the same ones.
        """
        head = self._STATE.pack(
            self._VERSION,
            self._n_seen,
            self._quiet,
            self._n_residuals,
            self._mean,
            self._var,
            self._change_mean,
            self._change_var,
            self._previous,
            self._short,
            self._long_mean,
            self._long_var,
            self._low,
            self._high,
            self._residual_mean,
            self._residual_var,
            self._residual_change_mean,
            self._residual_change_var,
            self._previous_residual,
            self._last_bin,
            self._second_last_bin,
        )
        season = struct.pack(f"<{self.season_slots}f", *self._season)
        return head + season + bytes(self._contexts)

    @classmethod
    def from_bytes(cls, data: bytes, **params: float) -> SurpriseDetector:
        """Rebuild a detector from :meth:`to_bytes` output and its parameters.

        Raises:
            ValueError: When ``data`` is not a state of this detector's version
                and table size.
        """
        detector = cls(**params)  # type: ignore[arg-type]
        season_size = 4 * detector.season_slots
        size = cls._STATE.size + season_size + detector.context_slots
        if len(data) != size or data[0] != cls._VERSION:
            message = (
                f"surprise detector state must be {size} bytes of "
                f"version {cls._VERSION} (got {len(data)} bytes)"
            )
            raise ValueError(message)
        fields = cls._STATE.unpack_from(data)
        detector._n_seen, detector._quiet, detector._n_residuals = fields[1:4]
        (
            detector._mean,
            detector._var,
            detector._change_mean,
            detector._change_var,
            detector._previous,
            detector._short,
            detector._long_mean,
            detector._long_var,
            detector._low,
            detector._high,
            detector._residual_mean,
            detector._residual_var,
            detector._residual_change_mean,
            detector._residual_change_var,
            detector._previous_residual,
            detector._last_bin,
            detector._second_last_bin,
        ) = fields[4:]
        season_end = cls._STATE.size + season_size
        season = struct.unpack(
            f"<{detector.season_slots}f", data[cls._STATE.size : season_end]
        )
        detector._season = array("f", season)
        detector._contexts = bytearray(data[season_end:])
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

    @property
    def warm(self) -> bool:
        """Return whether ``grace_period`` readings are learnt, so scores count."""
        return bool(self._gaussian.n_samples >= self.grace_period)

    def score_one(self, value: float, time_ms: int) -> float:
        """Score a value by its two-sided tail; 0 during the grace period.

        Args:
            value: The reading's value; must be finite.
            time_ms: Event time in epoch milliseconds; not used.

        Returns:
            The anomaly score in [0, 1].
        """
        if not self.warm:
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
