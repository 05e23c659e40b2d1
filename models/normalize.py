"""Turn one raw device payload into readings, and say exactly what was rejected.

The bridge stores MQTT payloads as they came; this module is the one place that
decides what they mean. It is pure: the caller passes the device id, the receive
time and the worker's clock, and gets back the readings plus one rejection per
part that could not be used. A bad part never spoils the good parts of the same
message, except where the bad part makes the whole message ambiguous (an invalid
time, a duplicated ``time`` key).

Accepted payloads (JSON, UTF-8):

* an object with an optional time field (``time``, ``ts`` or ``timestamp``) and
  metrics, flat (``{"time": ..., "rpm": 1200}``), under ``metrics`` as an object
  (``{"metrics": {"rpm": 1200}}``) or as a list of
  ``{"name", "value", "unit", "time"}`` items; optional ``attributes`` (object),
  ``units`` (object, metric to unit) and ``unit`` (one unit for all metrics).
  Every other top-level key is a metric, even next to ``metrics``.
* a SenML pack (RFC 8428): an array of records, base fields resolved.
* a bare JSON number, read as metric ``default_metric``.

Time values:

* a JSON number is epoch time whose unit follows from its magnitude: below
  ``1e11`` seconds, below ``1e14`` milliseconds, below ``1e17`` microseconds,
  below ``1e20`` nanoseconds; every instant from 2000 to the year 5138 has
  exactly one reading. SenML times are seconds, as RFC 8428 says.
* text is RFC 3339 (``2024-05-01T12:00:00.250Z``, ``...+02:00``; a space may
  replace ``T``). Text without ``Z`` or an offset is rejected: guessing the
  device's zone would shift its readings silently.
* the result is epoch milliseconds, UTC, rounded down; floats are first rounded
  to the microsecond so that ``1714564800.123`` gives ``...123`` ms.
* times before 2000-01-01T00:00:00Z, or more than ``max_clock_skew_ms`` after
  ``now_ms``, are rejected.

Known limits:

* Values become IEEE doubles: integers beyond 2**53 lose precision, and orjson
  reads integer literals beyond 2**64 as the nearest double instead of failing,
  so such a value is accepted, rounded. NaN, Infinity and numbers that overflow a
  double are not JSON (orjson refuses them): the whole message is invalid JSON.
* Duplicated keys: orjson keeps the last one silently. This module compares the
  number of ``":`` in the raw bytes with the number of keys parsed and re-parses
  with the standard library only when they differ, so the check costs almost
  nothing. It misses a duplicate only in a message that also writes a space
  before a colon and, in exactly compensating numbers, puts an escaped quote
  followed by a colon inside a string.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from models.records import Attributes, Reading

__all__ = [
    "MAX_ATTRIBUTES_BYTES",
    "MAX_METRIC_NAME_LENGTH",
    "MAX_UNIT_LENGTH",
    "MIN_TIME_MS",
    "NormalizeResult",
    "Rejection",
    "RejectionKind",
    "normalize_payload",
    "parse_time_ms",
]

MIN_TIME_MS = 946_684_800_000
# Values at or beyond 2^64 in magnitude are refused: JSON integers that large lose
# digits in parsing, and OTLP and most consumers cannot hold them exactly.
MAX_ABS_VALUE = 2.0**64
"""2000-01-01T00:00:00Z: earlier times come from devices whose clock is unset."""

MAX_METRIC_NAME_LENGTH = 128
# Deeper documents are refused whole (attributes nest, readings do not).
MAX_NESTING = 32
# A payload with more readings than this is refused whole.
MAX_READINGS_PER_PAYLOAD = 1000
MAX_UNIT_LENGTH = 64
# Attributes are copied into every reading of the payload; larger ones are refused
# (the readings go on without them), so no reading record nears Kafka's limit.
MAX_ATTRIBUTES_BYTES = 16 * 1024

# TODO: a reading without a time takes the bridge's receive time, which differs
# on an MQTT redelivery, so the worker's duplicate check (time and value) cannot
# see the copy and counts it again. The bridge could pass the MQTT DUP flag and
# packet id so the worker reuses the first copy's receive time.
TIME_SOURCE_ATTRIBUTE = "edge.time_source"

_TIME_KEYS = ("time", "ts", "timestamp")
_RESERVED_KEYS = frozenset((*_TIME_KEYS, "metrics", "attributes", "units", "unit"))

# SenML: times below 2**28 s are relative to now (RFC 8428, section 4.5.3).
_SENML_RELATIVE_LIMIT = 2**28
# The highest SenML version this module understands (RFC 8428 defines 10).
_SENML_VERSION = 10
_SENML_BASE_KEYS = frozenset(("bn", "bt", "bu", "bv", "bs", "bver"))
_SENML_OTHER_VALUES = ("vs", "vb", "vd")

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))?"
)


class RejectionKind(enum.StrEnum):
    """What kind of problem a rejection reports; stable strings for counters."""

    EMPTY = "empty"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    INVALID_PAYLOAD = "invalid_payload"
    DUPLICATE_KEY = "duplicate_key"
    INVALID_NAME = "invalid_name"
    INVALID_VALUE = "invalid_value"
    UNSUPPORTED_VALUE = "unsupported_value"
    INVALID_TIME = "invalid_time"
    TIME_OUT_OF_RANGE = "time_out_of_range"
    INVALID_FIELD = "invalid_field"


@dataclass(frozen=True, slots=True)
class Rejection:
    """One part of a payload that produced no reading, and why.

    Attributes:
        field: Path of the part in the payload: ``"temperature"``,
            ``"metrics.rpm"``, ``"metrics[2].value"``, ``"[0].vs"`` for a SenML
            record, or ``"payload"`` for the message as a whole.
        reason: A sentence naming the field, what it must be and what came;
            it carries a value only when that value is a number or a bool.
        kind: The category, for counters and dead-letter routing.
    """

    field: str
    reason: str
    kind: RejectionKind


@dataclass(slots=True)
class NormalizeResult:
    """The readings of one payload and the rejections of its bad parts."""

    readings: list[Reading] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


class _Invalid(Exception):
    """Internal: carries a rejection out of a nested check."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.reason)
        self.rejection = rejection


def _describe(value: Any) -> str:
    """Name the JSON type of ``value``, with the value itself if it is safe."""
    kind = type(value)
    if kind is bool:
        return f"bool {'true' if value else 'false'}"
    if kind is int or kind is float:
        return f"{kind.__name__} {value!r}"
    if value is None:
        return "null"
    if kind is dict:
        return "object"
    if kind is list:
        return "array"
    if kind is str:
        shown = value if len(value) <= 40 else value[:40] + "..."
        return f"str {json.dumps(shown, ensure_ascii=False)}"
    return kind.__name__


def _reject(path: str, expected: str, value: Any, kind: RejectionKind) -> Rejection:
    reason = f'field "{path}" must be {expected}, got {_describe(value)}'
    return Rejection(path, reason, kind)


def _time_from_number(
    path: str, value: int | float, unit_ms: float | None = None
) -> int:
    """Convert epoch time in s, ms, µs or ns (by magnitude) to epoch ms, floored."""
    magnitude = abs(value)
    if unit_ms is None:
        if magnitude < 1e11:
            unit_ms = 1000.0
        elif magnitude < 1e14:
            unit_ms = 1.0
        elif magnitude < 1e17:
            unit_ms = 1e-3
        elif magnitude < 1e20:
            unit_ms = 1e-6
        else:
            expected = "epoch time in s, ms, µs or ns (below 1e20)"
            raise _Invalid(_reject(path, expected, value, RejectionKind.INVALID_TIME))
    if type(value) is int:
        if unit_ms >= 1.0:
            return value * int(unit_ms)
        return value // round(1.0 / unit_ms)
    # Round to the microsecond first: 1714564800.123 s is 1714564800122.9998 ms.
    return math.floor(round(value * unit_ms * 1000.0) / 1000)


def _time_from_text(path: str, text: str) -> int:
    """Convert RFC 3339 text with ``Z`` or an offset to epoch ms, floored."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        expected = "RFC 3339 text such as 2024-05-01T12:00:00Z"
        raise _Invalid(_reject(path, expected, text, RejectionKind.INVALID_TIME))
    year, month, day, hour, minute, second, fraction, zulu, sign, oh, om = (
        match.groups()
    )
    if zulu is None and sign is None:
        expected = "RFC 3339 text with Z or a UTC offset"
        raise _Invalid(_reject(path, expected, text, RejectionKind.INVALID_TIME))
    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second),
            tzinfo=UTC,
        )  # fmt: skip
    except ValueError as exc:
        expected = "a valid calendar date and time (no leap second)"
        rejection = _reject(path, expected, text, RejectionKind.INVALID_TIME)
        raise _Invalid(rejection) from exc
    if sign is not None:
        if int(oh) > 23 or int(om) > 59:
            expected = "a UTC offset of at most 23:59 hours"
            rejection = _reject(path, expected, text, RejectionKind.INVALID_TIME)
            raise _Invalid(rejection)
        offset = timedelta(hours=int(oh), minutes=int(om))
        moment = moment - offset if sign == "+" else moment + offset
    millis = int((fraction or "0")[:3].ljust(3, "0"))
    # timestamp() of an aware datetime with whole seconds is exact.
    return int(moment.timestamp()) * 1000 + millis


def parse_time_ms(path: str, value: Any, *, now_ms: int, max_clock_skew_ms: int) -> int:
    """Convert a payload time value to epoch milliseconds, UTC, and check its range.

    Args:
        path: Name of the field, used in the rejection reason.
        value: The decoded JSON value: a number (s, ms, µs or ns by magnitude)
            or RFC 3339 text with ``Z`` or an offset.
        now_ms: The worker's clock, epoch ms.
        max_clock_skew_ms: How far after ``now_ms`` a time may lie.

    Returns:
        Epoch milliseconds, rounded down.

    Raises:
        ValueError: With the rejection reason as message, when the value is not
            a time or lies before 2000 or too far in the future.

    >>> parse_time_ms("t", 1714564800, now_ms=1714564800000, max_clock_skew_ms=0)
    1714564800000
    >>> parse_time_ms("t", "2024-05-01T14:00:00+02:00", now_ms=1714564800000,
    ...               max_clock_skew_ms=0)
    1714564800000
    """
    try:
        return _parse_time(path, value, now_ms, max_clock_skew_ms)
    except _Invalid as exc:
        raise ValueError(exc.rejection.reason) from exc


def _parse_time(path: str, value: Any, now_ms: int, max_clock_skew_ms: int) -> int:
    kind = type(value)
    if kind is int or kind is float:
        time_ms = _time_from_number(path, value)
    elif kind is str:
        time_ms = _time_from_text(path, value)
    else:
        expected = "epoch time as a number or RFC 3339 text"
        raise _Invalid(_reject(path, expected, value, RejectionKind.INVALID_TIME))
    _check_time_range(path, value, time_ms, now_ms, max_clock_skew_ms)
    return time_ms


def _check_time_range(
    path: str, value: Any, time_ms: int, now_ms: int, max_clock_skew_ms: int
) -> None:
    if time_ms < MIN_TIME_MS:
        expected = "at or after 2000-01-01T00:00:00Z"
        kind = RejectionKind.TIME_OUT_OF_RANGE
        raise _Invalid(_reject(path, expected, value, kind))
    if time_ms > now_ms + max_clock_skew_ms:
        expected = f"at most {max_clock_skew_ms} ms after the worker's clock"
        kind = RejectionKind.TIME_OUT_OF_RANGE
        raise _Invalid(_reject(path, expected, value, kind))


def _check_name(path: str, name: Any) -> str:
    if (
        type(name) is not str
        or not name
        or len(name) > MAX_METRIC_NAME_LENGTH
        or not name.isprintable()
    ):
        expected = f"a printable metric name of 1 to {MAX_METRIC_NAME_LENGTH} chars"
        raise _Invalid(_reject(path, expected, name, RejectionKind.INVALID_NAME))
    return name


def _check_value(path: str, value: Any) -> float:
    kind = type(value)
    # type() and not isinstance(): a bool is an int subclass but not a number here.
    if kind is float or kind is int:
        as_float = float(value)
        if -MAX_ABS_VALUE < as_float < MAX_ABS_VALUE:
            return as_float
        if math.isfinite(as_float):
            # orjson reads integers past 2^64 as rounded floats: the device's
            # number is already lost, so say so instead of passing a wrong value.
            reason = (
                f'field "{path}" must be a number of magnitude below 2^64,'
                f" got {kind.__name__} {value:g}"
            )
            raise _Invalid(Rejection(path, reason, RejectionKind.INVALID_VALUE))
    expected = "a finite number"
    raise _Invalid(_reject(path, expected, value, RejectionKind.INVALID_VALUE))


def _check_unit(path: str, unit: Any) -> str | None:
    if unit is None:
        return None
    if type(unit) is not str or len(unit) > MAX_UNIT_LENGTH:
        expected = f"a unit string of at most {MAX_UNIT_LENGTH} chars"
        raise _Invalid(_reject(path, expected, unit, RejectionKind.INVALID_FIELD))
    return unit


def _check_attributes(
    raw: Any, duplicates: frozenset[str], rejections: list[Rejection]
) -> Attributes:
    if raw is None:
        return {}
    if type(raw) is not dict:
        expected = "an object of attributes"
        kind = RejectionKind.INVALID_FIELD
        rejections.append(_reject("attributes", expected, raw, kind))
        return {}
    size = len(orjson.dumps(raw))
    if size > MAX_ATTRIBUTES_BYTES:
        reason = (
            f'field "attributes" must be at most {MAX_ATTRIBUTES_BYTES} bytes as'
            f" JSON, got {size} bytes; the readings go on without them"
        )
        rejections.append(Rejection("attributes", reason, RejectionKind.INVALID_FIELD))
        return {}
    attributes: Attributes = {}
    for key, value in raw.items():
        path = f"attributes.{key}"
        if value is None or path in duplicates:
            if value is None:
                rejection = _reject(
                    path, "a non-null value", value, RejectionKind.INVALID_FIELD
                )
            else:
                rejection = _duplicate(path)
            rejections.append(rejection)
            continue
        attributes[key] = value  # a JSON value: str, bool, number, list or object
    return attributes


def _duplicate(path: str) -> Rejection:
    reason = f'field "{path}" must appear once, got it several times'
    return Rejection(path, reason, RejectionKind.DUPLICATE_KEY)


def _keys_and_depth(document: Any) -> tuple[int, int]:
    """Count a document's object keys and measure its nesting (no recursion)."""
    keys = 0
    deepest = 0
    stack = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
        if type(node) is dict:
            keys += len(node)
            children = node.values()
        else:
            children = node
        for value in children:
            if type(value) is dict or type(value) is list:
                stack.append((value, depth + 1))
    return keys, deepest


def _duplicate_paths(payload: bytes) -> frozenset[str]:
    """Re-parse with the standard library and list the paths of duplicated keys."""
    found: set[str] = set()

    def pairs_hook(pairs: list[tuple[str, Any]]) -> _Pairs:
        return _Pairs(pairs)

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, _Pairs):
            seen: set[str] = set()
            for key, value in node.pairs:
                path = f"{prefix}.{key}" if prefix else key
                if key in seen:
                    found.add(path)
                seen.add(key)
                walk(value, path)
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{prefix}[{index}]")

    walk(json.loads(payload, object_pairs_hook=pairs_hook), "")
    return frozenset(found)


class _Pairs:
    """A JSON object as its raw key-value pairs, duplicates kept."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs


def _has_duplicate_under(duplicates: frozenset[str], prefix: str) -> bool:
    return any(path.startswith(prefix) for path in duplicates)


def normalize_payload(
    payload: bytes,
    *,
    device_id: str,
    received_ms: int,
    now_ms: int,
    max_clock_skew_ms: int,
    default_metric: str = "value",
) -> NormalizeResult:
    """Decode one device payload into readings and rejections.

    Args:
        payload: The MQTT payload bytes as received.
        device_id: The device the payload came from; copied into each reading.
        received_ms: The bridge's receive time, epoch ms. Readings without a
            time take it and carry ``attributes["edge.time_source"] ==
            "received"``; SenML relative times count from it, so a redelivered
            message gives the same times (and the windows can drop it as a
            duplicate).
        now_ms: The worker's clock, epoch ms, for the future-time check.
        max_clock_skew_ms: How far after ``now_ms`` a reading's time may lie.
        default_metric: Metric name of a bare-number payload.

    Returns:
        The readings, in payload order, and one rejection per unusable part.
        Nothing is raised for bad input.

    >>> result = normalize_payload(
    ...     b'{"time": 1714564800, "temperature": 71.5, "rpm": "1200"}',
    ...     device_id="press-7", received_ms=1714564801000,
    ...     now_ms=1714564801000, max_clock_skew_ms=60000)
    >>> [(r.metric, r.value, r.time_ms) for r in result.readings]
    [('temperature', 71.5, 1714564800000)]
    >>> result.rejections[0].reason
    'field "rpm" must be a finite number, got str "1200"'
    """
    result = NormalizeResult()
    if not payload:
        reason = 'field "payload" must be a JSON document, got an empty payload'
        result.rejections.append(Rejection("payload", reason, RejectionKind.EMPTY))
        return result

    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        result.rejections.append(_undecodable(str(exc)))
        return result

    kind = type(document)
    duplicates: frozenset[str] = frozenset()
    if kind is dict or kind is list:
        keys, depth = _keys_and_depth(document)
        if depth > MAX_NESTING:
            reason = (
                f'field "payload" must nest objects and arrays at most {MAX_NESTING}'
                f" levels deep, got {depth}"
            )
            result.rejections.append(
                Rejection("payload", reason, RejectionKind.INVALID_PAYLOAD)
            )
            return result
        if payload.count(b'":') != keys:
            duplicates = _duplicate_paths(payload)
    context = _Context(
        device_id, received_ms, now_ms, max_clock_skew_ms, duplicates, result
    )
    try:
        if kind is dict:
            context.add_object(document)
        elif kind is list:
            context.add_senml(document)
        elif kind is int or kind is float:
            context.add_metric(default_metric, "payload", document, None, None, {})
        else:
            expected = "a JSON object, a SenML array or a number"
            kind_ = RejectionKind.INVALID_PAYLOAD
            result.rejections.append(_reject("payload", expected, document, kind_))
    except _Invalid as exc:
        result.readings.clear()
        result.rejections.append(exc.rejection)
    if len(result.readings) > MAX_READINGS_PER_PAYLOAD:
        reason = (
            f'field "payload" must carry at most {MAX_READINGS_PER_PAYLOAD} readings,'
            f" got {len(result.readings)}"
        )
        result.readings.clear()
        result.rejections.clear()
        result.rejections.append(
            Rejection("payload", reason, RejectionKind.INVALID_PAYLOAD)
        )
    if not result.readings and not result.rejections:
        reason = 'field "payload" must carry at least one metric, got none'
        kind_ = RejectionKind.INVALID_PAYLOAD
        result.rejections.append(Rejection("payload", reason, kind_))
    return result


def _undecodable(message: str) -> Rejection:
    # orjson's messages give a position and a cause, never the payload's text.
    if "UTF-8" in message:
        reason = f'field "payload" must be UTF-8 text, got invalid UTF-8 ({message})'
        return Rejection("payload", reason, RejectionKind.INVALID_UTF8)
    reason = (
        f'field "payload" must be JSON (no NaN, Infinity or overflowing numbers), '
        f"got invalid JSON ({message})"
    )
    return Rejection("payload", reason, RejectionKind.INVALID_JSON)


class _Context:
    """The per-message state shared by the payload forms."""

    __slots__ = (
        "device_id",
        "received_ms",
        "now_ms",
        "max_clock_skew_ms",
        "duplicates",
        "result",
    )

    def __init__(
        self,
        device_id: str,
        received_ms: int,
        now_ms: int,
        max_clock_skew_ms: int,
        duplicates: frozenset[str],
        result: NormalizeResult,
    ) -> None:
        self.device_id = device_id
        self.received_ms = received_ms
        self.now_ms = now_ms
        self.max_clock_skew_ms = max_clock_skew_ms
        self.duplicates = duplicates
        self.result = result

    def add_metric(
        self,
        name: Any,
        path: str,
        value: Any,
        time_ms: int | None,
        unit: str | None,
        attributes: Attributes,
    ) -> None:
        """Validate one metric and append its reading or its rejection."""
        try:
            metric = _check_name(path, name)
            number = _check_value(path, value)
        except _Invalid as exc:
            self.result.rejections.append(exc.rejection)
            return
        if time_ms is None:
            time_ms = self.received_ms
            attributes = {**attributes, TIME_SOURCE_ATTRIBUTE: "received"}
        else:
            attributes = dict(attributes)
        reading = Reading(self.device_id, metric, number, time_ms, unit, attributes)
        self.result.readings.append(reading)

    def message_time(self, document: dict[str, Any]) -> int | None:
        """Return the time of an object payload, or None when it has none."""
        if "time" in document and "ts" not in document and "timestamp" not in document:
            if "time" in self.duplicates:
                raise _Invalid(_duplicate("time"))
            value = document["time"]
            return _parse_time("time", value, self.now_ms, self.max_clock_skew_ms)
        present = [key for key in _TIME_KEYS if key in document]
        if not present:
            return None
        key = present[0]
        if len(present) > 1:
            reason = f'field "{present[1]}" must not be given together with "{key}"'
            raise _Invalid(Rejection(present[1], reason, RejectionKind.INVALID_FIELD))
        if key in self.duplicates:
            raise _Invalid(_duplicate(key))
        return _parse_time(key, document[key], self.now_ms, self.max_clock_skew_ms)

    def add_object(self, document: dict[str, Any]) -> None:
        """Add the readings of a JSON object payload (flat or under metrics)."""
        duplicates = self.duplicates
        if duplicates:
            for key in ("metrics", "attributes", "units", "unit"):
                if key in duplicates:
                    raise _Invalid(_duplicate(key))
        time_ms = self.message_time(document)

        units = document.get("units")
        if units is not None and type(units) is not dict:
            expected = "an object of metric units"
            raise _Invalid(
                _reject("units", expected, units, RejectionKind.INVALID_FIELD)
            )
        default_unit = _check_unit("unit", document.get("unit"))
        attributes = _check_attributes(
            document.get("attributes"), duplicates, self.result.rejections
        )

        plain = not duplicates and units is None
        for key, value in document.items():
            if key in _RESERVED_KEYS:
                continue
            if plain:
                self.add_metric(key, key, value, time_ms, default_unit, attributes)
            else:
                self._add_keyed(
                    key, key, value, time_ms, units, default_unit, attributes
                )

        metrics = document.get("metrics")
        if type(metrics) is dict:
            for key, value in metrics.items():
                path = f"metrics.{key}"
                self._add_keyed(
                    key, path, value, time_ms, units, default_unit, attributes
                )
        elif type(metrics) is list:
            for index, item in enumerate(metrics):
                self._add_item(index, item, time_ms, units, default_unit, attributes)
        elif "metrics" in document:
            expected = "an object or an array of metrics"
            kind = RejectionKind.INVALID_FIELD
            self.result.rejections.append(_reject("metrics", expected, metrics, kind))

    def _add_keyed(
        self,
        key: str,
        path: str,
        value: Any,
        time_ms: int | None,
        units: dict[str, Any] | None,
        default_unit: str | None,
        attributes: Attributes,
    ) -> None:
        duplicates = self.duplicates
        if duplicates and (path in duplicates or f"units.{key}" in duplicates):
            self.result.rejections.append(_duplicate(path))
            return
        unit = default_unit
        if units is not None and key in units:
            try:
                unit = _check_unit(f"units.{key}", units[key])
            except _Invalid as exc:
                self.result.rejections.append(exc.rejection)
                return
        self.add_metric(key, path, value, time_ms, unit, attributes)

    def _add_item(
        self,
        index: int,
        item: Any,
        time_ms: int | None,
        units: dict[str, Any] | None,
        default_unit: str | None,
        attributes: Attributes,
    ) -> None:
        prefix = f"metrics[{index}]"
        rejections = self.result.rejections
        if type(item) is not dict:
            expected = "an object with name and value"
            rejections.append(
                _reject(prefix, expected, item, RejectionKind.INVALID_FIELD)
            )
            return
        if _has_duplicate_under(self.duplicates, prefix + "."):
            rejections.append(_duplicate(prefix))
            return
        try:
            name = _check_name(f"{prefix}.name", item.get("name"))
            if "time" in item:
                time_ms = _parse_time(
                    f"{prefix}.time", item["time"], self.now_ms, self.max_clock_skew_ms
                )
            unit = default_unit
            if "unit" in item:
                unit = _check_unit(f"{prefix}.unit", item["unit"])
            elif units is not None and name in units:
                unit = _check_unit(f"units.{name}", units[name])
        except _Invalid as exc:
            rejections.append(exc.rejection)
            return
        self.add_metric(
            name, f"{prefix}.value", item.get("value"), time_ms, unit, attributes
        )

    def add_senml(self, pack: list[Any]) -> None:
        """Add the readings of a SenML pack (RFC 8428), resolving base fields."""
        if not pack:
            expected = "a non-empty SenML pack"
            raise _Invalid(
                _reject("payload", expected, pack, RejectionKind.INVALID_PAYLOAD)
            )
        base_name = ""
        base_time = 0.0
        base_unit: str | None = None
        base_value = 0.0
        for index, record in enumerate(pack):
            prefix = f"[{index}]"
            if type(record) is not dict:
                expected = "a SenML record (object)"
                kind = RejectionKind.INVALID_PAYLOAD
                self.result.rejections.append(_reject(prefix, expected, record, kind))
                continue
            if _has_duplicate_under(self.duplicates, prefix + "."):
                if not _SENML_BASE_KEYS.isdisjoint(record):
                    # Later records inherit the ambiguous base fields: drop them all.
                    raise _Invalid(_duplicate(prefix))
                self.result.rejections.append(_duplicate(prefix))
                continue
            if not _SENML_BASE_KEYS.isdisjoint(record):
                base_name, base_time, base_unit, base_value = self._senml_base(
                    prefix, record, base_name, base_time, base_unit, base_value
                )
            self._add_senml_record(
                prefix, record, base_name, base_time, base_unit, base_value
            )

    def _senml_base(
        self,
        prefix: str,
        record: dict[str, Any],
        name: str,
        time_s: float,
        unit: str | None,
        value: float,
    ) -> tuple[str, float, str | None, float]:
        # A bad base field spoils every later record, so it rejects the pack.
        version = record.get("bver", _SENML_VERSION)
        if type(version) is not int or not 0 < version <= _SENML_VERSION:
            expected = f"a SenML version from 1 to {_SENML_VERSION}"
            path = f"{prefix}.bver"
            raise _Invalid(
                _reject(path, expected, version, RejectionKind.INVALID_FIELD)
            )
        if "bn" in record:
            name = record["bn"]
            if type(name) is not str:
                expected = "a base name string"
                kind = RejectionKind.INVALID_NAME
                raise _Invalid(_reject(f"{prefix}.bn", expected, name, kind))
        if "bt" in record:
            time_s = _check_value(f"{prefix}.bt", record["bt"])
        if "bu" in record:
            unit = _check_unit(f"{prefix}.bu", record["bu"])
        if "bv" in record:
            value = _check_value(f"{prefix}.bv", record["bv"])
        return name, time_s, unit, value

    def _add_senml_record(
        self,
        prefix: str,
        record: dict[str, Any],
        base_name: str,
        base_time: float,
        base_unit: str | None,
        base_value: float,
    ) -> None:
        rejections = self.result.rejections
        if "v" not in record:
            for key in _SENML_OTHER_VALUES:
                if key in record:
                    path = f"{prefix}.{key}"
                    reason = (
                        f'field "{path}" must be a numeric "v" value: string, '
                        f"boolean and data values are not supported, got {key}"
                    )
                    kind = RejectionKind.UNSUPPORTED_VALUE
                    rejections.append(Rejection(path, reason, kind))
                    return
            if "n" in record or "s" in record or _SENML_BASE_KEYS.isdisjoint(record):
                expected = 'a record with a numeric "v"'
                kind = RejectionKind.INVALID_VALUE
                rejections.append(_reject(prefix, expected, record, kind))
            return  # a record of base fields only

        for key in record:
            if key.endswith("_"):
                # RFC 8428: a field ending in "_" must be understood or refused.
                path = f"{prefix}.{key}"
                reason = f'field "{path}" must be understood, got an unknown field'
                rejections.append(Rejection(path, reason, RejectionKind.INVALID_FIELD))
                return

        name = record.get("n", "")
        try:
            if type(name) is not str:
                expected = "a name string"
                path = f"{prefix}.n"
                raise _Invalid(
                    _reject(path, expected, name, RejectionKind.INVALID_NAME)
                )
            value = base_value + _check_value(f"{prefix}.v", record["v"])
            unit = _check_unit(f"{prefix}.u", record.get("u", base_unit))
            time_ms = self._senml_time(prefix, record, base_time)
        except _Invalid as exc:
            rejections.append(exc.rejection)
            return
        attributes: Attributes = {}
        if time_ms is None:
            time_ms = self.received_ms
            attributes = {TIME_SOURCE_ATTRIBUTE: "received"}
        self.add_metric(
            base_name + name, f"{prefix}.n", value, time_ms, unit, attributes
        )

    def _senml_time(
        self, prefix: str, record: dict[str, Any], base_time: float
    ) -> int | None:
        if "t" not in record and base_time == 0.0:
            return None
        path = f"{prefix}.t"
        offset = _check_value(path, record.get("t", 0.0))
        time_s = base_time + offset
        if time_s < _SENML_RELATIVE_LIMIT:
            time_ms = self.received_ms + _time_from_number(path, time_s, 1000.0)
        else:
            time_ms = _time_from_number(path, time_s, 1000.0)
        _check_time_range(path, time_s, time_ms, self.now_ms, self.max_clock_skew_ms)
        return time_ms
