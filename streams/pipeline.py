"""One worker step per raw message: normalize, window, detect, decide.

:class:`Pipeline` is what the Faust agent calls for every ``telemetry-raw`` message
and every idle tick. It holds no state of its own: series and device state live in
the mappings it is given (Faust tables in the worker, dicts in unit tests), each
value a compact byte string, so a restarted or rebalanced worker continues from
the changelog where the last one stopped.

Exactly-once counting under at-least-once delivery, two ways:

* Kafka replays after a crash or rebalance: each device remembers the offset of
  the last ``telemetry-raw`` record it applied (a device always lives in one
  partition), so a record processed again is skipped whole: not counted, not
  learnt, not late, no rule evaluated.
* MQTT redeliveries (a new record with the same content): a reading whose time
  and value are already counted in its open window is dropped as a duplicate
  before it reaches the detector or the rules. Known limit: a redelivery that
  arrives after its window closed is reported late.
"""

from __future__ import annotations

import base64
import logging
import struct
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

from models.detectors import (
    DEFAULT_THRESHOLD,
    Detector,
    DetectorSpec,
    build_detector,
    restore_detector,
)
from models.normalize import Rejection, normalize_payload
from models.records import AnomalyScore, DeadLetter, Decision, Reading, WindowSummary
from models.rules import Evaluation, RuleSet, RuleState, decide
from models.windows import ClosedWindow, SeriesWindows, WindowSpec, summarize
from streams.tablestore import WriteBackStore

logger = logging.getLogger(__name__)

StateStore = MutableMapping[bytes, bytes]

# Series state: the lengths of three blobs (tumbling windows, hopping windows,
# detector), then the blobs and the unit text.
_SERIES_HEADER = struct.Struct("<III")
# Device state: applied offset, series count, rule state length; then per series
# its metric name length, blob length, name and blob; then the rule state.
_DEVICE_HEADER = struct.Struct("<qII")
_ENTRY_HEADER = struct.Struct("<HI")
# Dead letters keep at most this much of the original payload.
DEAD_LETTER_MAX_PAYLOAD_BYTES = 64 * 1024
# A payload's rejected parts make at most this many dead letters (each carrying
# the payload); the last one counts the rest, so a small payload of thousands of
# bad parts cannot flood the topic.
MAX_DEAD_LETTERS_PER_MESSAGE = 20
_SEP = "\x1f"


@dataclass
class Outputs:
    """Everything one step produced, to be sent by the caller in this order."""

    readings: list[Reading] = field(default_factory=list)
    summaries: list[WindowSummary] = field(default_factory=list)
    anomalies: list[AnomalyScore] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    next_idle_deadline_ms: int | None = None


@dataclass
class PipelineCounters:
    """Running totals of the worker's pipeline (see the ``/counters`` view)."""

    raw_messages: int = 0
    replayed: int = 0
    readings: int = 0
    duplicates: int = 0
    late: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    summaries: int = 0
    anomalies: int = 0
    decisions: int = 0
    suppressed: int = 0
    idle_closes: int = 0

    def snapshot(self) -> dict[str, int]:
        """Return the counters as a plain dict."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class PipelineConfig:
    """What the pipeline does; built once from the settings."""

    window: WindowSpec
    hopping: WindowSpec | None
    detector: DetectorSpec
    detector_by_metric: dict[str, DetectorSpec]
    threshold: float
    threshold_by_metric: dict[str, float]
    max_clock_skew_ms: int
    ruleset: RuleSet
    max_series_per_device: int = 64


class _Series:
    """Decoded state of one (device, metric) series during one step."""

    __slots__ = ("tumbling", "hopping", "detector", "unit")

    def __init__(
        self,
        tumbling: SeriesWindows,
        hopping: SeriesWindows | None,
        detector: Detector,
        unit: str | None,
    ) -> None:
        self.tumbling = tumbling
        self.hopping = hopping
        self.detector = detector
        self.unit = unit

    def to_bytes(self) -> bytes:
        tumbling = self.tumbling.to_bytes()
        hopping = self.hopping.to_bytes() if self.hopping is not None else b""
        detector = self.detector.to_bytes()
        unit = (self.unit or "").encode()
        header = _SERIES_HEADER.pack(len(tumbling), len(hopping), len(detector))
        return b"".join((header, tumbling, hopping, detector, unit))

    @property
    def next_deadline_ms(self) -> int | None:
        deadlines = [self.tumbling.next_deadline_ms]
        if self.hopping is not None:
            deadlines.append(self.hopping.next_deadline_ms)
        known = [d for d in deadlines if d is not None]
        return min(known) if known else None


class _DeviceState:
    """One device's state: applied offset, its series (lazily decoded), rules."""

    __slots__ = ("applied_offset", "blobs", "series", "rules")

    def __init__(
        self, applied_offset: int, blobs: dict[str, bytes], rules: RuleState
    ) -> None:
        self.applied_offset = applied_offset
        self.blobs = blobs
        self.series: dict[str, _Series] = {}
        self.rules = rules

    @classmethod
    def decode(cls, raw: bytes | None) -> _DeviceState:
        if not raw:
            return cls(-1, {}, RuleState.from_bytes(None))
        applied_offset, count, rules_len = _DEVICE_HEADER.unpack_from(raw)
        at = _DEVICE_HEADER.size
        blobs = {}
        for _ in range(count):
            name_len, blob_len = _ENTRY_HEADER.unpack_from(raw, at)
            at += _ENTRY_HEADER.size
            name = raw[at : at + name_len].decode()
            at += name_len
            blobs[name] = raw[at : at + blob_len]
            at += blob_len
        rules = RuleState.from_bytes(raw[at : at + rules_len])
        return cls(applied_offset, blobs, rules)

    def encode(self) -> bytes:
        rules = self.rules.to_bytes()
        parts = [_DEVICE_HEADER.pack(self.applied_offset, len(self.blobs), len(rules))]
        for metric, blob in self.blobs.items():
            series = self.series.get(metric)
            data = series.to_bytes() if series is not None else blob
            name = metric.encode()
            parts.append(_ENTRY_HEADER.pack(len(name), len(data)))
            parts.append(name)
            parts.append(data)
        parts.append(rules)
        return b"".join(parts)


class Pipeline:
    """Turn raw device payloads into readings, windows, scores and decisions.

    Not thread-safe; one instance per worker, called by one agent at a time.
    """

    def __init__(self, config: PipelineConfig, *, clock_ms: Callable[[], int]) -> None:
        self.config = config
        self.counters = PipelineCounters()
        self._clock_ms = clock_ms

    # -- public steps ------------------------------------------------------------

    def process_raw(
        self,
        *,
        device_id: str,
        payload: bytes,
        received_ms: int,
        source: str,
        partition: int | None,
        offset: int | None,
        store: StateStore,
    ) -> Outputs:
        """Process one ``telemetry-raw`` message of ``device_id``.

        Bad parts of the payload become dead letters naming the field; the good
        parts go on. Never raises for bad input. Idleness is measured on the
        bridge's receive clock (``received_ms``), so a backlog in Kafka does not
        make a busy device look idle.
        """
        now_ms = self._clock_ms()
        out = Outputs()
        self.counters.raw_messages += 1
        key = device_id.encode()
        state = _load_state(store, key)
        if offset is not None and offset <= state.applied_offset:
            # Read again after a crash or rebalance: everything it produced,
            # dead letters included, went out the first time.
            self.counters.replayed += 1
            return out
        result = normalize_payload(
            payload,
            device_id=device_id,
            received_ms=received_ms,
            now_ms=now_ms,
            max_clock_skew_ms=self.config.max_clock_skew_ms,
        )
        rejections = result.rejections
        self.counters.rejected += len(rejections)
        if len(rejections) > MAX_DEAD_LETTERS_PER_MESSAGE:
            shown = MAX_DEAD_LETTERS_PER_MESSAGE - 1
            more = len(rejections) - shown
            following = rejections[shown]
            reason = (
                f"{more} more parts of this payload were rejected (the first"
                f" {shown} have letters of their own; the next: {following.reason})"
            )
            rest = Rejection("payload", reason, following.kind)
            rejections = [*rejections[:shown], rest]
        for rejection in rejections:
            out.dead_letters.append(
                self._dead_letter(
                    "normalize", rejection.reason, source, device_id, partition,
                    offset, received_ms, payload, rejection.field,
                )
            )  # fmt: skip

        # TODO: device and series state is never evicted: a device that went
        # away keeps its record in the table (about 5 KB) for good, and metrics
        # a device sent once (a payload of junk keys) keep counting against
        # EDGE_MAX_SERIES_PER_DEVICE. Dropping series with no open window and no
        # reading for a configurable time (a tombstone in the changelog) would
        # bound both.
        refused: list[str] = []
        for reading in result.readings:
            if (
                reading.metric not in state.blobs
                and len(state.blobs) >= self.config.max_series_per_device
            ):
                refused.append(reading.metric)
                continue
            series = self._series(state, reading.metric, reading.unit)
            late = self._process_reading(
                reading, series, state.rules, now_ms, received_ms, out
            )
            if late:
                out.dead_letters.append(
                    self._late_letter(
                        reading, source, partition, offset, received_ms, payload
                    )
                )
        self._close_idle_series(
            device_id, state, {r.metric for r in result.readings}, received_ms, out
        )
        if refused:
            self.counters.rejected += len(refused)
            out.dead_letters.append(
                self._dead_letter(
                    "normalize", self._series_limit_reason(device_id, refused),
                    source, device_id, partition, offset, received_ms, payload,
                    refused[0],
                )
            )  # fmt: skip
        if offset is not None:
            state.applied_offset = offset
        _save_state(store, key, state)
        out.next_idle_deadline_ms = self._device_deadline(state)
        return out

    def close_idle(self, *, device_id: str, tick_ms: int, store: StateStore) -> Outputs:
        """Close the windows of ``device_id``'s series that have been idle too long.

        ``tick_ms`` is when the tick was sent. The tick travels in the device's own
        partition, behind every message received before it, so a series whose
        last reading was received more than the idle timeout before ``tick_ms`` is
        really idle. Returns the closed windows' summaries (and decisions on them)
        and the next wall time at which the device's remaining windows may go idle.
        """
        out = Outputs()
        key = device_id.encode()
        state = _load_state(store, key)
        for metric in list(state.blobs):
            series = self._series(state, metric, None)
            closed = list(series.tumbling.close_idle(tick_ms))
            if series.hopping is not None:
                closed.extend(series.hopping.close_idle(tick_ms))
            if closed:
                self.counters.idle_closes += len(closed)
                self._emit_windows(device_id, metric, series, closed, state.rules, out)
        if out.summaries:
            _save_state(store, key, state)
        out.next_idle_deadline_ms = self._device_deadline(state)
        return out

    def _close_idle_series(
        self,
        device_id: str,
        state: _DeviceState,
        touched: set[str],
        received_ms: int,
        out: Outputs,
    ) -> None:
        """Close the idle windows of the device's other series, on its receive clock.

        Every record of the device received before this one precedes it in the
        partition, so a series silent for the idle timeout before ``received_ms``
        has nothing more on its way. Only series decoded already are looked at;
        the others close on the device's next idle tick.
        """
        for metric, series in list(state.series.items()):
            if metric in touched:
                continue
            closed = list(series.tumbling.close_idle(received_ms))
            if series.hopping is not None:
                closed.extend(series.hopping.close_idle(received_ms))
            if closed:
                self.counters.idle_closes += len(closed)
                self._emit_windows(device_id, metric, series, closed, state.rules, out)

    def device_deadline(self, device_id: str, store: StateStore) -> int | None:
        """Return the earliest idle deadline of the device's series (from state)."""
        state = _load_state(store, device_id.encode())
        for metric in list(state.blobs):
            self._series(state, metric, None)
        return self._device_deadline(state)

    def inspect_device(self, raw: bytes) -> dict[str, tuple[int, object]]:
        """Decode a device record: per metric, its stored size and live state.

        For benchmarks and debugging; returns ``{metric: (bytes, series)}``.
        """
        state = _DeviceState.decode(raw)
        sizes = {metric: len(blob) for metric, blob in state.blobs.items()}
        return {
            metric: (sizes[metric], self._series(state, metric, None))
            for metric in sizes
        }

    # -- steps of one reading ------------------------------------------------------

    def _process_reading(
        self,
        reading: Reading,
        series: _Series,
        rule_state: RuleState,
        now_ms: int,
        received_ms: int,
        out: Outputs,
    ) -> bool:
        """Window, score and decide one reading; return True when it was late."""
        added = series.tumbling.add(reading.time_ms, reading.value, received_ms)
        closed = list(added.closed)
        if series.hopping is not None:
            hopped = series.hopping.add(reading.time_ms, reading.value, received_ms)
            closed.extend(hopped.closed)
        if added.duplicate:
            self.counters.duplicates += 1
            return False
        if added.late and not added.accepted:
            self.counters.late += 1
            self._emit_windows(
                reading.device_id, reading.metric, series, closed, rule_state, out
            )
            return True

        self.counters.readings += 1
        out.readings.append(reading)
        if reading.unit and not series.unit:
            series.unit = reading.unit
        # A score given during warm-up means "no score yet": rules see none.
        warm = series.detector.warm
        score = series.detector.score_then_learn(reading.value, reading.time_ms)
        threshold = self.config.threshold_by_metric.get(
            reading.metric, self.config.threshold
        )
        if warm and score >= threshold:
            self.counters.anomalies += 1
            spec = self.config.detector_by_metric.get(
                reading.metric, self.config.detector
            )
            out.anomalies.append(
                AnomalyScore(
                    device_id=reading.device_id,
                    metric=reading.metric,
                    time_ms=reading.time_ms,
                    value=reading.value,
                    anomaly_score=score,
                    threshold=threshold,
                    detector=spec.name,
                    unit=reading.unit,
                )
            )
        evaluation = Evaluation.of_reading(reading, score if warm else None)
        self._decide(evaluation, rule_state, now_ms, out)
        self._emit_windows(
            reading.device_id, reading.metric, series, closed, rule_state, out
        )
        return False

    def _emit_windows(
        self,
        device_id: str,
        metric: str,
        series: _Series,
        closed: list[ClosedWindow],
        rule_state: RuleState,
        out: Outputs,
    ) -> None:
        now_ms = self._clock_ms()
        for window in closed:
            summary = summarize(window, device_id, metric, series.unit)
            self.counters.summaries += 1
            out.summaries.append(summary)
            self._decide(Evaluation.of_window(summary), rule_state, now_ms, out)

    def _decide(
        self, evaluation: Evaluation, rule_state: RuleState, now_ms: int, out: Outputs
    ) -> None:
        result = decide(self.config.ruleset, rule_state, evaluation, now_ms)
        self.counters.suppressed += len(result.suppressed)
        if result.decision is not None:
            self.counters.decisions += 1
            out.decisions.append(result.decision)

    # -- state -----------------------------------------------------------------------

    def _spec_for(self, metric: str) -> DetectorSpec:
        return self.config.detector_by_metric.get(metric, self.config.detector)

    def _series(self, state: _DeviceState, metric: str, unit: str | None) -> _Series:
        """Return the decoded series of ``metric``, decoding or creating it once."""
        series = state.series.get(metric)
        if series is not None:
            return series
        raw = state.blobs.get(metric)
        if raw is not None:
            series = self._decode_series(raw, metric)
            state.blobs[metric] = b""  # encode() uses the decoded series from now on
        else:
            hopping = self.config.hopping
            series = _Series(
                SeriesWindows(self.config.window),
                SeriesWindows(hopping) if hopping is not None else None,
                build_detector(self._spec_for(metric)),
                unit,
            )
            state.blobs[metric] = b""
        state.series[metric] = series
        return series

    def _decode_series(self, raw: bytes, metric: str) -> _Series:
        t_len, h_len, d_len = _SERIES_HEADER.unpack_from(raw)
        at = _SERIES_HEADER.size
        tumbling = SeriesWindows.from_bytes(raw[at : at + t_len], self.config.window)
        at += t_len
        hopping = None
        if self.config.hopping is not None and h_len:
            hopping = SeriesWindows.from_bytes(
                raw[at : at + h_len], self.config.hopping
            )
        elif self.config.hopping is not None:
            hopping = SeriesWindows(self.config.hopping)
        at += h_len
        detector = restore_detector(self._spec_for(metric), raw[at : at + d_len])
        unit = raw[at + d_len :].decode() or None
        return _Series(tumbling, hopping, detector, unit)

    @staticmethod
    def _device_deadline(state: _DeviceState) -> int | None:
        deadlines = [s.next_deadline_ms for s in state.series.values()]
        known = [d for d in deadlines if d is not None]
        return min(known) if known else None

    # -- dead letters ---------------------------------------------------------------

    def _dead_letter(
        self,
        stage: str,
        reason: str,
        source: str,
        device_id: str,
        partition: int | None,
        offset: int | None,
        received_ms: int,
        payload: bytes,
        field_name: str | None,
    ) -> DeadLetter:
        self.counters.dead_lettered += 1
        kept = payload[:DEAD_LETTER_MAX_PAYLOAD_BYTES]
        return DeadLetter(
            stage=stage,
            reason=reason,
            source=source,
            device_id=device_id,
            partition=partition,
            offset=offset,
            received_at_ms=received_ms,
            payload_b64=base64.b64encode(kept).decode(),
            truncated=len(kept) < len(payload),
            field=field_name,
        )

    def _series_limit_reason(self, device_id: str, refused: list[str]) -> str:
        limit = self.config.max_series_per_device
        names = ", ".join(f'"{m}"' for m in refused[:5])
        more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
        return (
            f'device "{device_id}" already has {limit} series, the most a device may'
            f" have (EDGE_MAX_SERIES_PER_DEVICE); readings of new metrics are"
            f" refused: {names}{more}"
        )

    def _late_letter(
        self,
        reading: Reading,
        source: str,
        partition: int | None,
        offset: int | None,
        received_ms: int,
        payload: bytes,
    ) -> DeadLetter:
        lateness_s = self.config.window.allowed_lateness_ms / 1000
        reason = (
            f'reading "{reading.metric}" at time_ms={reading.time_ms} is late: its '
            f"window already closed (allowed lateness {lateness_s:g} s, "
            "EDGE_ALLOWED_LATENESS_S)"
        )
        return self._dead_letter(
            "window", reason, source, reading.device_id, partition, offset,
            received_ms, payload, reading.metric,
        )  # fmt: skip


def _load_state(store: StateStore, key: bytes) -> _DeviceState:
    """Return the device's state; a caching store hands out its decoded object."""
    if isinstance(store, WriteBackStore):
        return store.load(key, _DeviceState.decode)
    return _DeviceState.decode(store.get(key))


def _save_state(store: StateStore, key: bytes, state: _DeviceState) -> None:
    if isinstance(store, WriteBackStore):
        store.save(key, state)
    else:
        store[key] = state.encode()


def default_threshold() -> float:
    """Return the default detector's recommended anomaly threshold."""
    return DEFAULT_THRESHOLD
