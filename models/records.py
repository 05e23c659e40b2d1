"""Records that travel on the pipeline's topics, and their JSON encoding.

Every record is a frozen, slotted dataclass with ``to_json()`` / ``from_json()``;
the field names below are the contract topic subscribers rely on and are
documented once, in ``docs/TOPICS.md``. JSON is encoded with orjson.

Why dataclasses and not ``faust.Record``: the worker builds several records per
reading, and a Faust record's constructor and serializer cost several times more
than a slotted dataclass plus orjson; the records stay typed either way and Faust
topics carry them as raw bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

AttributeValue = str | bool | int | float | list[Any] | dict[str, Any]
Attributes = dict[str, AttributeValue]

T = TypeVar("T", bound="_JsonRecord")


class _JsonRecord:
    """Mixin: orjson encoding of a dataclass, decoding that ignores unknown keys."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a plain dict (what ``to_json`` encodes)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload,no-any-return]

    def to_json(self) -> bytes:
        """Encode the record as compact JSON bytes."""
        return orjson.dumps(self, option=orjson.OPT_SERIALIZE_DATACLASS)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Build a record from a dict; keys the record does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls: type[T], raw: bytes | str) -> T:
        """Decode JSON produced by :meth:`to_json`."""
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} JSON must be an object, got {type(data)}")
        return cls.from_dict(data)


@dataclass(frozen=True, slots=True)
class Reading(_JsonRecord):
    """One measured value from one device at one time.

    ``time_ms`` is event time in epoch milliseconds, UTC. When the device sent no
    time, the bridge's receive time is used and ``attributes["edge.time_source"]``
    is ``"received"``.
    """

    device_id: str
    metric: str
    value: float
    time_ms: int
    unit: str | None = None
    attributes: Attributes = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WindowSummary(_JsonRecord):
    """Aggregate of one series over the half-open window ``[start, end)``.

    ``kind`` is ``"tumbling"`` or ``"hopping"``; ``closed_by`` says whether the
    watermark or the idle timeout closed it. Quantiles come from a streaming
    sketch and are estimates; count, sum, min, max, mean and last are exact.
    """

    device_id: str
    metric: str
    window_start_ms: int
    window_end_ms: int
    count: int
    sum: float
    min: float
    max: float
    mean: float
    last: float
    p50: float
    p95: float
    p99: float
    kind: str = "tumbling"
    unit: str | None = None
    closed_by: str = "watermark"


@dataclass(frozen=True, slots=True)
class AnomalyScore(_JsonRecord):
    """A reading's anomaly score; higher means more anomalous, in ``[0, 1]``."""

    device_id: str
    metric: str
    time_ms: int
    value: float
    anomaly_score: float
    threshold: float
    detector: str
    unit: str | None = None


@dataclass(frozen=True, slots=True)
class Decision(_JsonRecord):
    """The outcome of a rule firing for a device.

    ``time_ms`` is the event time of the reading or window that fired the rule;
    ``decided_at_ms`` is the worker's wall clock. ``evidence`` holds the values
    the condition looked at; ``command`` the MQTT command sent, if any.
    """

    rule_id: str
    device_id: str
    metric: str
    action: str
    priority: int
    confidence: float
    time_ms: int
    decided_at_ms: int
    evidence: dict[str, Any] = field(default_factory=dict)
    command: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter(_JsonRecord):
    """Something that could not be processed, with where it came from and why.

    ``payload_b64`` carries the original bytes (base64) when they are at most
    the dead-letter size limit; larger payloads are cut and ``truncated`` is set.
    """

    stage: str
    reason: str
    source: str
    device_id: str | None = None
    partition: int | None = None
    offset: int | None = None
    received_at_ms: int | None = None
    payload_b64: str | None = None
    truncated: bool = False
    field: str | None = None
