"""Event-time windows of one series (device, metric) as a pure state machine.

The window agent keeps one :class:`SeriesWindows` per series key in a Faust table,
as the bytes of :meth:`SeriesWindows.to_bytes`, and calls :meth:`SeriesWindows.add`
for each reading and :meth:`SeriesWindows.close_idle` from a timer. Nothing here
reads a clock: wall time comes in as ``now_wall_ms``.

How it works:

* Windows are half-open ``[start, end)`` and aligned to the epoch. Tumbling
  windows have ``step_ms == size_ms``; hopping windows start every ``step_ms``,
  which must divide ``size_ms``, so each reading belongs to ``size_ms //
  step_ms`` windows. A reading at ``end`` belongs to the next window.
* State is kept per *pane*, the ``step_ms`` wide slice of time that windows are
  made of; a window is the union of its panes when it closes, so a hopping
  reading is stored once and not once per window.
* The watermark is the greatest event time the series has seen. A window closes
  when ``watermark >= end + allowed_lateness_ms``. A series that received no
  reading for ``idle_timeout_ms`` of wall time also closes windows, with
  ``closed_by="idle"``, so the last window of a quiet device is emitted; how
  many depends on the spec's ``idle_close``:

  - ``"clock"`` (the default): from the last reading on, the watermark is taken
    to advance with the wall clock, and a window closes once its end plus the
    allowed lateness has passed on that estimate. A device that pauses and
    then goes on within its window loses nothing, and its windows are the same
    as if it had never paused; the last window of a device that stopped comes
    out once its end has passed on the device's own clock.
  - ``"all"``: every open window closes at once. For replays of history and
    other sources whose event time runs far from the wall clock, where waiting
    for a window's end on the wall clock would mean waiting for hours; a
    reading that arrives afterwards for a closed window is late.
* A reading whose windows have all closed is *late*: it changes nothing and the
  caller dead-letters it. In hopping windows a reading can be late for its
  oldest windows and still be counted in its newer ones: both flags are set.
* Each pane keeps exact aggregates (count, min, max, last and the running exact
  sum, as the partials of Shewchuk's algorithm, so the sum equals ``math.fsum``
  of the readings in any arrival order) and the ``(time_ms, value)`` pairs of its
  most recent ``kept_readings_per_pane`` readings. The pairs tell a redelivered
  reading (same time and value) from a new one and give exact quantiles. Older
  pairs of a busy pane are *spilled*: their values go into a KLL quantile sketch
  (Apache DataSketches) and the pair is forgotten, so the state of a series is
  bounded however fast its device sends.

Known limits:

* Quantiles are exact (linear interpolation between closest ranks) while every
  reading of the window is kept; past that they are the sketch's estimates
  (nearest rank; with ``k = 64`` within 4% of rank with 99% confidence) and
  ``ClosedWindow.complete`` is false. count, sum, min, max and last stay exact.
* Redeliveries are recognised among the kept pairs only: a copy that arrives
  after ``kept_readings_per_pane`` newer readings of its pane is counted again.
  MQTT redelivers right after a reconnect, far inside that horizon.
* A redelivered reading whose window has closed cannot be told from new data: it
  is reported late. So is a reading for a window closed by the idle timeout:
  with ``idle_close="clock"`` only when it is as late as the watermark rule would
  find it (a device flushing readings it buffered through an outage longer than
  the allowed lateness, for example).
* One reading far ahead of the others (a device clock jump) moves the watermark:
  it closes the open windows and makes the following, correct readings late.
  The normaliser's ``max_clock_skew_ms`` bounds how far ahead that can be.
* State size: about 12 bytes per kept reading plus a fixed part per pane; a
  spilled pane adds its sketch (at most about 1.8 KiB), so a pane never exceeds
  about 3.5 KiB with the defaults.
"""

from __future__ import annotations

import math
import struct
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from datasketches import kll_doubles_sketch

from models.records import WindowSummary

__all__ = [
    "MAX_OPEN_PANES",
    "AddResult",
    "ClosedWindow",
    "SeriesWindows",
    "WindowSpec",
    "summarize",
]

MAX_OPEN_PANES = 1000
"""Most panes a series may hold: ``(allowed_lateness_ms + size_ms) / step_ms``."""

# Stands for "never" in integer fields, so the state packs into fixed structs.
_NEVER = -(2**63)
_STATE_VERSION = 2
# version, size_ms, step_ms, max_time_ms, closed_through_ms, last_seen_wall_ms,
# pane count
_HEADER = struct.Struct("<BqqqqqI")
# start_ms, readings kept, readings spilled, last_time_ms, last_value
_PANE = struct.Struct("<qIIqd")
# of the spilled readings: min, max, number of sum partials, sketch length
_SPILL = struct.Struct("<ddBI")
# KLL's accuracy parameter: within 4% of rank (99% confidence), at most about
# 1.8 KiB serialized.
SKETCH_K = 64
# Times are stored as uint32 offsets from the pane start.
_MAX_STEP_MS = 2**32 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowSpec:
    """Configuration of the windows of every series.

    Attributes:
        size_ms: Window length, ms.
        idle_timeout_ms: Wall time without readings after which a series' open
            windows are closed, ms.
        step_ms: Hop between window starts for hopping windows, ms; must divide
            ``size_ms``. None (the default) means tumbling windows.
        allowed_lateness_ms: How long after the watermark passed a window's end
            it stays open for out-of-order readings, ms.
        kept_readings_per_pane: Most recent readings whose ``(time, value)``
            pairs a pane keeps, for deduplication and exact quantiles; older
            ones go into its sketch (see the module's known limits).
        idle_close: Which windows an idle series closes: ``"clock"`` those whose
            end plus the lateness has passed on the series' clock estimated
            from the wall clock, ``"all"`` every open one (see the module
            docstring).

    Raises:
        ValueError: When a value is out of range, naming it and its value.
    """

    size_ms: int
    idle_timeout_ms: int
    step_ms: int | None = None
    allowed_lateness_ms: int = 0
    kept_readings_per_pane: int = 128
    idle_close: Literal["clock", "all"] = "clock"

    def __post_init__(self) -> None:
        step_ms = self.hop_ms
        problem = None
        if self.size_ms <= 0:
            problem = f"size_ms must be positive, got {self.size_ms}"
        elif not 0 < step_ms <= min(self.size_ms, _MAX_STEP_MS):
            problem = f"step_ms must be in 1..size_ms, got {self.step_ms}"
        elif self.size_ms % step_ms:
            problem = f"step_ms must divide size_ms={self.size_ms}, got {step_ms}"
        elif self.allowed_lateness_ms < 0:
            lateness = self.allowed_lateness_ms
            problem = f"allowed_lateness_ms must be >= 0, got {lateness}"
        elif self.idle_timeout_ms <= 0:
            timeout = self.idle_timeout_ms
            problem = f"idle_timeout_ms must be positive, got {timeout}"
        elif self.kept_readings_per_pane <= 0:
            limit = self.kept_readings_per_pane
            problem = f"kept_readings_per_pane must be positive, got {limit}"
        elif self.idle_close not in ("clock", "all"):
            problem = f'idle_close must be "clock" or "all", got {self.idle_close!r}'
        elif self.max_open_panes > MAX_OPEN_PANES:
            problem = (
                f"(allowed_lateness_ms + size_ms) / step_ms must be at most "
                f"{MAX_OPEN_PANES}, got {self.max_open_panes}"
            )
        if problem is not None:
            raise ValueError(f"invalid window spec: {problem}")

    @property
    def hop_ms(self) -> int:
        """Return the distance between window starts, ms (``size_ms`` if tumbling)."""
        return self.size_ms if self.step_ms is None else self.step_ms

    @property
    def kind(self) -> Literal["tumbling", "hopping"]:
        """Return ``"tumbling"`` or ``"hopping"``, as in ``WindowSummary.kind``."""
        return "tumbling" if self.hop_ms == self.size_ms else "hopping"

    @property
    def max_open_panes(self) -> int:
        """Return the most panes one series can hold at a time."""
        return (self.allowed_lateness_ms + self.size_ms) // self.hop_ms + 1


@dataclass(frozen=True, slots=True)
class ClosedWindow:
    """The aggregate of one window of one series, at the time it closed.

    ``count``, ``sum``, ``min``, ``max`` and ``last`` are exact; ``last`` is the
    value with the greatest time, the latest arrival among equal times. The
    quantiles are exact when ``complete`` is true, sketch estimates otherwise
    (see the module's limits).
    """

    window_start_ms: int
    window_end_ms: int
    count: int
    sum: float
    min: float
    max: float
    last: float
    p50: float
    p95: float
    p99: float
    kind: Literal["tumbling", "hopping"]
    closed_by: Literal["watermark", "idle"]
    complete: bool = True


class AddResult(NamedTuple):
    """What :meth:`SeriesWindows.add` did with one reading.

    Attributes:
        accepted: The reading was counted in at least one window.
        duplicate: The same time and value were already counted; nothing changed.
        late: At least one window of the reading had closed, so it is missing
            there (for tumbling windows: the reading was not counted at all).
        closed: Windows the reading's time closed, oldest first.
    """

    accepted: bool
    duplicate: bool
    late: bool
    closed: tuple[ClosedWindow, ...] = ()


_ACCEPTED = AddResult(True, False, False)
_DUPLICATE = AddResult(False, True, False)
_LATE = AddResult(False, False, True)
_PARTLY_LATE = AddResult(True, False, True)


@dataclass(slots=True)
class _Pane:
    """The readings of one ``step_ms`` wide slice of time."""

    start_ms: int
    # The most recent readings in arrival order, and the same pairs as a set.
    kept: deque[tuple[int, float]] = field(default_factory=deque)
    kept_keys: set[tuple[int, float]] = field(default_factory=set)
    last_time_ms: int = _NEVER
    last_value: float = 0.0
    # Readings no longer kept: counted exactly, their values in the sketch.
    spilled_count: int = 0
    spilled_partials: list[float] = field(default_factory=list)
    spilled_min: float = math.inf
    spilled_max: float = -math.inf
    sketch: kll_doubles_sketch | None = None

    def keep(self, key: tuple[int, float], limit: int) -> None:
        """Keep one new reading, spilling the oldest kept one past ``limit``."""
        if len(self.kept) >= limit:
            old = self.kept.popleft()
            self.kept_keys.discard(old)
            self.spill(old[1])
        self.kept.append(key)
        self.kept_keys.add(key)

    def spill(self, value: float) -> None:
        """Count ``value`` in the exact aggregates and the sketch only."""
        if self.sketch is None:
            self.sketch = kll_doubles_sketch(SKETCH_K)
        self.sketch.update(value)
        self.spilled_count += 1
        _add_exactly(self.spilled_partials, value)
        self.spilled_min = min(self.spilled_min, value)
        self.spilled_max = max(self.spilled_max, value)


def _add_exactly(partials: list[float], value: float) -> None:
    """Add ``value`` to a running sum kept as non-overlapping partials.

    Shewchuk's algorithm: ``math.fsum(partials)`` is then the correctly rounded
    sum of every value added, whatever the order. Values are finite and below
    2**64 in magnitude (the normaliser sees to it), so nothing overflows; the
    partials stay few (one or two for sensor data).

    >>> partials = []
    >>> for value in (1e16, 1.0, -1e16):
    ...     _add_exactly(partials, value)
    >>> math.fsum(partials)
    1.0
    """
    count = 0
    for other in partials:
        if abs(value) < abs(other):
            value, other = other, value
        high = value + other
        low = other - (high - value)
        if low:
            partials[count] = low
            count += 1
        value = high
    partials[count:] = [value]


class SeriesWindows:
    """The open windows of one series and its watermark.

    Not thread-safe; one instance belongs to one series key, used by the one
    agent that owns the key's partition.

    >>> windows = SeriesWindows(WindowSpec(size_ms=60_000, idle_timeout_ms=120_000))
    >>> windows.add(0, 1.5, now_wall_ms=0).accepted
    True
    >>> [(w.window_start_ms, w.count) for w in windows.add(60_000, 2.0, 1).closed]
    [(0, 1)]
    """

    __slots__ = ("spec", "_panes", "_max_time_ms", "_closed_through_ms", "_seen_ms")

    def __init__(self, spec: WindowSpec) -> None:
        self.spec = spec
        self._panes: dict[int, _Pane] = {}
        self._max_time_ms = _NEVER
        # Every window with end <= this has been emitted (or never had readings).
        self._closed_through_ms = _NEVER
        self._seen_ms = _NEVER

    @property
    def watermark_ms(self) -> int | None:
        """Return the greatest event time seen, or None before the first reading."""
        return None if self._max_time_ms == _NEVER else self._max_time_ms

    @property
    def next_deadline_ms(self) -> int | None:
        """Return the wall time at which :meth:`close_idle` will close windows.

        None when no window is open, so a timer only needs to look at series
        whose deadline has passed.
        """
        if not self._panes:
            return None
        spec = self.spec
        idle_at_ms = self._seen_ms + spec.idle_timeout_ms
        if spec.idle_close == "all":
            return idle_at_ms
        # The earliest open window holds the oldest pane; its end is the first
        # multiple of the hop past both that pane and what is closed already.
        hop_ms = spec.hop_ms
        first_end_ms = max(
            min(self._panes) + hop_ms, (self._closed_through_ms // hop_ms + 1) * hop_ms
        )
        due_after_ms = first_end_ms + spec.allowed_lateness_ms - self._max_time_ms
        return max(idle_at_ms, self._seen_ms + due_after_ms)

    @property
    def open_window_count(self) -> int:
        """Return the number of windows with at least one reading still open."""
        spec = self.spec
        hop_ms = spec.hop_ms
        starts: set[int] = set()
        for pane_start in self._panes:
            first = pane_start - spec.size_ms + hop_ms
            for start in range(first, pane_start + 1, hop_ms):
                if start + spec.size_ms > self._closed_through_ms:
                    starts.add(start)
        return len(starts)

    def add(self, time_ms: int, value: float, now_wall_ms: int) -> AddResult:
        """Count one reading and close the windows its time completes.

        Args:
            time_ms: The reading's event time, epoch ms.
            value: The reading's value, finite.
            now_wall_ms: The worker's wall clock, epoch ms, for the idle timeout.

        Returns:
            Whether the reading was counted, a duplicate or late, and the windows
            closed by the watermark, oldest first.
        """
        spec = self.spec
        hop_ms = spec.hop_ms
        if now_wall_ms > self._seen_ms:
            self._seen_ms = now_wall_ms

        pane_start = time_ms - time_ms % hop_ms
        closed_through_ms = self._closed_through_ms
        if pane_start + spec.size_ms <= closed_through_ms:
            return _LATE
        pane = self._panes.get(pane_start)
        if pane is None:
            pane = self._panes[pane_start] = _Pane(pane_start)
        key = (time_ms, value)
        if key in pane.kept_keys:
            return _DUPLICATE

        pane.keep(key, spec.kept_readings_per_pane)
        if time_ms >= pane.last_time_ms:
            pane.last_time_ms = time_ms
            pane.last_value = value

        result = _PARTLY_LATE if pane_start + hop_ms <= closed_through_ms else _ACCEPTED
        if time_ms <= self._max_time_ms:
            return result
        self._max_time_ms = time_ms
        through_ms = time_ms - spec.allowed_lateness_ms
        if through_ms <= closed_through_ms:
            return result
        closed = self._close_through(through_ms, "watermark")
        return result._replace(closed=closed) if closed else result

    def close_idle(self, now_wall_ms: int) -> tuple[ClosedWindow, ...]:
        """Close the windows an idle series is done with (see ``idle_close``).

        Args:
            now_wall_ms: Wall clock, epoch ms, on the same clock as the
                ``now_wall_ms`` given to :meth:`add`.

        Returns:
            The closed windows, oldest first, with ``closed_by == "idle"``; empty
            when a reading arrived less than ``idle_timeout_ms`` ago or no open
            window is due yet.
        """
        if not self._panes:
            return ()
        spec = self.spec
        silent_ms = now_wall_ms - self._seen_ms
        if silent_ms < spec.idle_timeout_ms:
            return ()
        if spec.idle_close == "all":
            through_ms = max(self._panes) + spec.size_ms
        else:
            through_ms = self._max_time_ms + silent_ms - spec.allowed_lateness_ms
            if through_ms <= self._closed_through_ms:
                return ()
        return self._close_through(through_ms, "idle")

    def _close_through(
        self, through_ms: int, closed_by: Literal["watermark", "idle"]
    ) -> tuple[ClosedWindow, ...]:
        """Emit the windows whose end lies in (closed through, ``through_ms``]."""
        spec = self.spec
        size_ms = spec.size_ms
        hop_ms = spec.hop_ms
        previous_ms = self._closed_through_ms
        self._closed_through_ms = through_ms
        panes = self._panes

        starts: set[int] = set()
        for pane_start in panes:
            for start in range(pane_start - size_ms + hop_ms, pane_start + 1, hop_ms):
                if previous_ms < start + size_ms <= through_ms:
                    starts.add(start)
        closed = []
        for start in sorted(starts):
            members = [
                pane
                for pane_start in range(start, start + size_ms, hop_ms)
                if (pane := panes.get(pane_start)) is not None
            ]
            closed.append(_close_window(start, size_ms, members, spec.kind, closed_by))

        for pane_start in [p for p in panes if p + size_ms <= through_ms]:
            del panes[pane_start]
        return tuple(closed)

    def to_bytes(self) -> bytes:
        """Serialize the state compactly (the spec itself is not included).

        Returns:
            45 bytes, plus 32 per open pane and 12 per reading it keeps, plus
            the sketch and sum partials of a pane that spilled readings.
        """
        spec = self.spec
        parts = [
            _HEADER.pack(
                _STATE_VERSION,
                spec.size_ms,
                spec.hop_ms,
                self._max_time_ms,
                self._closed_through_ms,
                self._seen_ms,
                len(self._panes),
            )
        ]
        for pane in self._panes.values():
            kept = pane.kept
            start_ms = pane.start_ms
            parts.append(
                _PANE.pack(
                    start_ms,
                    len(kept),
                    pane.spilled_count,
                    pane.last_time_ms,
                    pane.last_value,
                )
            )
            if pane.spilled_count and pane.sketch is not None:
                sketch = pane.sketch.serialize()
                partials = pane.spilled_partials
                parts.append(
                    _SPILL.pack(
                        pane.spilled_min, pane.spilled_max, len(partials), len(sketch)
                    )
                )
                parts.append(array("d", partials).tobytes())
                parts.append(sketch)
            offsets = array("I", [time_ms - start_ms for time_ms, _ in kept])
            values = array("d", [value for _, value in kept])
            parts.append(offsets.tobytes())
            parts.append(values.tobytes())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes, spec: WindowSpec) -> SeriesWindows:
        """Rebuild a state written by :meth:`to_bytes`.

        Args:
            data: The serialized state.
            spec: The spec of the running worker; its size and step must match
                the ones the state was written with.

        Returns:
            The state, ready to continue exactly where it stopped.

        Raises:
            ValueError: When the bytes are not a state of this version, or were
                written with another window size or step (the caller decides
                whether to start the series afresh).
        """
        try:
            return cls._unpack(data, spec)
        except (struct.error, IndexError) as exc:
            message = "window state must be bytes from to_bytes, got corrupt data"
            raise ValueError(message) from exc

    @classmethod
    def _unpack(cls, data: bytes, spec: WindowSpec) -> SeriesWindows:
        version, size_ms, hop_ms, max_time_ms, through_ms, seen_ms, pane_count = (
            _HEADER.unpack_from(data, 0)
        )
        if version != _STATE_VERSION:
            message = f"window state version must be {_STATE_VERSION}, got {version}"
            raise ValueError(message)
        if (size_ms, hop_ms) != (spec.size_ms, spec.hop_ms):
            message = (
                f"window state must match size_ms={spec.size_ms} and "
                f"step_ms={spec.hop_ms}, got size_ms={size_ms} and step_ms={hop_ms}"
            )
            raise ValueError(message)
        windows = cls(spec)
        windows._max_time_ms = max_time_ms
        windows._closed_through_ms = through_ms
        windows._seen_ms = seen_ms

        offset = _HEADER.size
        for _ in range(pane_count):
            start_ms, kept_count, spilled_count, last_time_ms, last_value = (
                _PANE.unpack_from(data, offset)
            )
            offset += _PANE.size
            pane = _Pane(start_ms, last_time_ms=last_time_ms, last_value=last_value)
            if spilled_count:
                low, high, partial_count, sketch_len = _SPILL.unpack_from(data, offset)
                offset += _SPILL.size
                partials = array("d")
                partials.frombytes(data[offset : offset + 8 * partial_count])
                offset += 8 * partial_count
                sketch = data[offset : offset + sketch_len]
                offset += sketch_len
                if len(sketch) != sketch_len:
                    raise IndexError("pane shorter than its sketch")
                pane.spilled_count = spilled_count
                pane.spilled_min, pane.spilled_max = low, high
                pane.spilled_partials = list(partials)
                pane.sketch = _decode_sketch(sketch)
            if offset + 12 * kept_count > len(data):
                raise IndexError("pane shorter than its count")
            offsets = array("I")
            offsets.frombytes(data[offset : offset + 4 * kept_count])
            offset += 4 * kept_count
            values = array("d")
            values.frombytes(data[offset : offset + 8 * kept_count])
            offset += 8 * kept_count
            times = [start_ms + delta for delta in offsets]
            pane.kept = deque(zip(times, values, strict=True))
            pane.kept_keys = set(pane.kept)
            windows._panes[start_ms] = pane
        if offset != len(data):
            raise IndexError("trailing bytes after the last pane")
        return windows


def _decode_sketch(data: bytes) -> kll_doubles_sketch:
    try:
        return kll_doubles_sketch.deserialize(data)
    except (RuntimeError, ValueError) as exc:
        raise IndexError("pane sketch is corrupt") from exc


def _close_window(
    start_ms: int,
    size_ms: int,
    panes: list[_Pane],
    kind: Literal["tumbling", "hopping"],
    closed_by: Literal["watermark", "idle"],
) -> ClosedWindow:
    """Merge the panes of one window, oldest first, into its aggregate."""
    values = sorted(value for pane in panes for _, value in pane.kept)
    spilled = [pane for pane in panes if pane.spilled_count]
    count = len(values) + sum(pane.spilled_count for pane in spilled)
    # fsum: the exact sum rounded once, the same in any arrival order.
    total = math.fsum(
        [*values, *(p for pane in spilled for p in pane.spilled_partials)]
    )
    low = min([*values[:1], *(pane.spilled_min for pane in spilled)])
    high = max([*values[-1:], *(pane.spilled_max for pane in spilled)])
    # Panes do not overlap in time, so the newest pane holds the latest reading.
    last = panes[-1].last_value
    if spilled:
        quantiles = _estimated_quantiles(values, spilled)
    else:
        quantiles = (
            _quantile(values, 0.5),
            _quantile(values, 0.95),
            _quantile(values, 0.99),
        )
    return ClosedWindow(
        window_start_ms=start_ms,
        window_end_ms=start_ms + size_ms,
        count=count,
        sum=total,
        min=low,
        max=high,
        last=last,
        p50=quantiles[0],
        p95=quantiles[1],
        p99=quantiles[2],
        kind=kind,
        closed_by=closed_by,
        complete=not spilled,
    )


def _estimated_quantiles(
    kept: list[float], spilled: list[_Pane]
) -> tuple[float, float, float]:
    """Return p50, p95 and p99 of the kept values and the spilled panes' sketches."""
    merged = kll_doubles_sketch(SKETCH_K)
    for pane in spilled:
        if pane.sketch is not None:
            merged.merge(pane.sketch)
    for value in kept:
        merged.update(value)
    p50, p95, p99 = (merged.get_quantile(q) for q in (0.5, 0.95, 0.99))
    return float(p50), float(p95), float(p99)


def _quantile(ordered: list[float], q: float) -> float:
    """Return the q-quantile of sorted values, linear between closest ranks.

    >>> _quantile([1.0, 2.0, 3.0, 4.0], 0.5)
    2.5
    """
    position = (len(ordered) - 1) * q
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    fraction = position - below
    return ordered[below] + (ordered[above] - ordered[below]) * fraction


def summarize(
    closed: ClosedWindow, device_id: str, metric: str, unit: str | None
) -> WindowSummary:
    """Build the ``window-summaries`` record of a closed window.

    Args:
        closed: A window returned by :meth:`SeriesWindows.add` or
            :meth:`SeriesWindows.close_idle`.
        device_id: The series' device.
        metric: The series' metric.
        unit: The metric's unit, if known.

    Returns:
        The summary; ``mean`` is ``sum / count``.
    """
    return WindowSummary(
        device_id=device_id,
        metric=metric,
        window_start_ms=closed.window_start_ms,
        window_end_ms=closed.window_end_ms,
        count=closed.count,
        sum=closed.sum,
        min=closed.min,
        max=closed.max,
        mean=closed.sum / closed.count,
        last=closed.last,
        p50=closed.p50,
        p95=closed.p95,
        p99=closed.p99,
        kind=closed.kind,
        unit=unit,
        closed_by=closed.closed_by,
    )
