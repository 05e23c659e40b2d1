"""Pure encoding of the pipeline's records as OTLP requests (no I/O).

Window summaries become metrics, anomalies and decisions become log records. The
mapping, documented for users in ``docs/OTLP.md``:

* Resource, one per device: ``service.name`` = ``edge-otlp``,
  ``service.instance.id``, ``edge.site`` and ``device.id``; the scope is
  ``edge-otlp`` with the exporter's version. Each appears once per request, never
  per data point.
* A :class:`~models.records.WindowSummary` is one ``Summary`` data point of the
  metric named after the series: ``count`` and ``sum`` as is, and quantile values
  at 0 (min), 0.5, 0.95, 0.99 and 1 (max). ``start_time_unix_nano`` and
  ``time_unix_nano`` are the window's bounds. OTLP's ``Summary`` has no
  temporality field; each point covers only its own window, which is what a
  delta point would say. ``mean`` (``sum / count``) is recoverable; ``last`` and
  ``closed_by`` are not exported.
* An :class:`~models.records.AnomalyScore` is a WARN log record with event name
  ``edge.anomaly``; a :class:`~models.records.Decision` an INFO log record with
  event name ``edge.decision`` whose observed time is when the worker decided.

Milliseconds become nanoseconds here and nowhere else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    InstrumentationScope,
    KeyValue,
)
from opentelemetry.proto.logs.v1.logs_pb2 import (
    SEVERITY_NUMBER_INFO,
    SEVERITY_NUMBER_WARN,
    LogRecord,
    ScopeLogs,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    Metric,
    ScopeMetrics,
    SummaryDataPoint,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from models.records import AnomalyScore, Decision, WindowSummary

SCOPE_NAME = "edge-otlp"
SERVICE_NAME = "edge-otlp"
ANOMALY_EVENT = "edge.anomaly"
DECISION_EVENT = "edge.decision"

NS_PER_MS = 1_000_000
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Device and common spellings -> UCUM (https://ucum.org). Anything else passes
# through unchanged, so a unit that already is UCUM stays as the device sent it.
UCUM_UNITS: Mapping[str, str] = {
    "c": "Cel",
    "°c": "Cel",
    "degc": "Cel",
    "celsius": "Cel",
    "f": "[degF]",
    "°f": "[degF]",
    "degf": "[degF]",
    "fahrenheit": "[degF]",
    "k": "K",
    "kelvin": "K",
    "percent": "%",
    "pct": "%",
    "%rh": "%",
    "ratio": "1",
    "sec": "s",
    "secs": "s",
    "second": "s",
    "seconds": "s",
    "msec": "ms",
    "millisecond": "ms",
    "milliseconds": "ms",
    "min": "min",
    "minutes": "min",
    "hour": "h",
    "hours": "h",
    "volt": "V",
    "volts": "V",
    "amp": "A",
    "amps": "A",
    "ampere": "A",
    "watt": "W",
    "watts": "W",
    "kwh": "kW.h",
    "wh": "W.h",
    "hz": "Hz",
    "hertz": "Hz",
    "rpm": "1/min",
    "pa": "Pa",
    "hpa": "hPa",
    "kpa": "kPa",
    "mbar": "mbar",
    "psi": "[psi]",
    "lux": "lx",
    "ppm": "[ppm]",
    "ppb": "[ppb]",
    "db": "dB",
    "dba": "dB",
    "m/s2": "m/s2",
    "km/h": "km/h",
    "kph": "km/h",
    "mph": "[mi_i]/h",
    "byte": "By",
    "bytes": "By",
    "kb": "kBy",
    "mb": "MBy",
    "l/min": "L/min",
    "lpm": "L/min",
    "m3/h": "m3/h",
    "g": "g",
    "kg": "kg",
}

# Quantiles of a window summary, as (quantile, record field). 0 and 1 carry the
# exact min and max, the others the sketch's estimates.
SUMMARY_QUANTILES: Sequence[tuple[float, str]] = (
    (0.0, "min"),
    (0.5, "p50"),
    (0.95, "p95"),
    (0.99, "p99"),
    (1.0, "max"),
)


@dataclass(frozen=True, slots=True)
class ResourceInfo:
    """What every resource of one exporter carries besides the device.

    Attributes:
        service_instance_id: this exporter process's stable id
            (``service.instance.id``).
        site: the site name (``edge.site``).
        service_version: the project's version, used as the scope version.
    """

    service_instance_id: str
    site: str
    service_version: str = "0.1.0"


def ucum_unit(unit: str | None) -> str:
    """Return the UCUM spelling of a unit; unknown units pass through.

    Args:
        unit: the unit as the device sent it, or None.

    Returns:
        The UCUM unit, ``""`` for None or blank.

    >>> ucum_unit("°C"), ucum_unit("kWh"), ucum_unit("m"), ucum_unit(None)
    ('Cel', 'kW.h', 'm', '')
    """
    if unit is None or not unit.strip():
        return ""
    text = unit.strip()
    return UCUM_UNITS.get(text.lower(), text)


def encode_value(value: Any) -> AnyValue | None:
    """Map one Python value to an OTLP ``AnyValue``; None means "drop it".

    Mapping by type: ``bool`` -> bool, ``int`` -> int (signed 64-bit; outside
    that range the decimal text, as OTLP has no bigger integer), ``float`` ->
    double, ``str`` -> string, ``bytes`` -> bytes, ``list``/``tuple`` ->
    ``ArrayValue`` (a None element becomes an empty value so positions hold),
    ``dict`` -> its JSON text with sorted keys, ``None`` -> dropped. Any other
    type becomes its ``str()`` text.

    Args:
        value: the value to map.

    Returns:
        The encoded value, or None when ``value`` is None.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return AnyValue(int_value=value)
        return AnyValue(string_value=str(value))
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, list | tuple):
        array = AnyValue()
        array.array_value.SetInParent()
        for item in value:
            element = encode_value(item)
            array.array_value.values.append(element or AnyValue())
        return array
    if isinstance(value, dict):
        return AnyValue(string_value=_json_text(value))
    return AnyValue(string_value=str(value))


def encode_attributes(attributes: Mapping[str, Any]) -> list[KeyValue]:
    """Map a dict to OTLP key-values, in insertion order, None values dropped.

    Args:
        attributes: attribute names and values (see :func:`encode_value`).

    Returns:
        The key-values to put in a resource, data point or log record.
    """
    pairs = []
    for key, raw in attributes.items():
        value = encode_value(raw)
        if value is not None:
            pairs.append(KeyValue(key=key, value=value))
    return pairs


def encode_metrics(
    summaries: Iterable[WindowSummary], *, resource_info: ResourceInfo
) -> ExportMetricsServiceRequest:
    """Encode window summaries as one OTLP metrics export request.

    Summaries are grouped by device (one resource each, in order of first
    appearance) and, within a device, by series name and unit (one metric each).
    A hopping window's point carries ``edge.window.kind = "hopping"`` so it does
    not collide with the tumbling window of the same series.

    Args:
        summaries: the window summaries; any order, any devices.
        resource_info: exporter-wide resource attributes.

    Returns:
        The request; empty when there are no summaries.

    Raises:
        ValueError: when a window bound is negative (OTLP times are unsigned).
    """
    request = ExportMetricsServiceRequest()
    scopes: dict[str, ScopeMetrics] = {}
    metrics: dict[tuple[str, str, str], Metric] = {}
    for summary in summaries:
        scope = scopes.get(summary.device_id)
        if scope is None:
            resource = request.resource_metrics.add()
            _fill_resource(resource.resource, summary.device_id, resource_info)
            scope = resource.scope_metrics.add()
            scope.scope.CopyFrom(_scope(resource_info))
            scopes[summary.device_id] = scope

        unit = ucum_unit(summary.unit)
        key = (summary.device_id, summary.metric, unit)
        metric = metrics.get(key)
        if metric is None:
            metric = scope.metrics.add(name=summary.metric, unit=unit)
            metric.summary.SetInParent()
            metrics[key] = metric
        metric.summary.data_points.append(_summary_point(summary))
    return request


def encode_logs(
    records: Iterable[AnomalyScore | Decision], *, resource_info: ResourceInfo
) -> ExportLogsServiceRequest:
    """Encode anomalies and decisions as one OTLP logs export request.

    Records are grouped by device (one resource each, in order of first
    appearance) under one scope; their order within a device is kept.

    Args:
        records: anomaly scores and decisions, mixed, any devices.
        resource_info: exporter-wide resource attributes.

    Returns:
        The request; empty when there are no records.

    Raises:
        ValueError: when a time is negative (OTLP times are unsigned).
    """
    request = ExportLogsServiceRequest()
    scopes: dict[str, ScopeLogs] = {}
    for record in records:
        scope = scopes.get(record.device_id)
        if scope is None:
            resource = request.resource_logs.add()
            _fill_resource(resource.resource, record.device_id, resource_info)
            scope = resource.scope_logs.add()
            scope.scope.CopyFrom(_scope(resource_info))
            scopes[record.device_id] = scope
        if isinstance(record, AnomalyScore):
            scope.log_records.append(_anomaly_log(record))
        else:
            scope.log_records.append(_decision_log(record))
    return request


def count_metric_points(request: ExportMetricsServiceRequest) -> int:
    """Return the number of data points of every kind in a metrics request."""
    total = 0
    for resource in request.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                total += len(metric_points(metric))
    return total


def count_log_records(request: ExportLogsServiceRequest) -> int:
    """Return the number of log records in a logs request."""
    return sum(
        len(scope.log_records)
        for resource in request.resource_logs
        for scope in resource.scope_logs
    )


def metric_points(metric: Metric) -> Any:
    """Return the repeated data-point field of a metric, whatever its kind.

    Returns:
        The protobuf repeated container (empty when the metric has no data).
    """
    kind = metric.WhichOneof("data")
    if kind is None:
        return []
    return getattr(metric, kind).data_points


def _summary_point(summary: WindowSummary) -> SummaryDataPoint:
    point = SummaryDataPoint(
        start_time_unix_nano=_nanos(summary.window_start_ms, "window_start_ms"),
        time_unix_nano=_nanos(summary.window_end_ms, "window_end_ms"),
        count=summary.count,
        sum=summary.sum,
    )
    for quantile, field_name in SUMMARY_QUANTILES:
        point.quantile_values.add(
            quantile=quantile, value=float(getattr(summary, field_name))
        )
    if summary.kind != "tumbling":
        point.attributes.append(
            KeyValue(key="edge.window.kind", value=AnyValue(string_value=summary.kind))
        )
    return point


def _anomaly_log(record: AnomalyScore) -> LogRecord:
    body = (
        f"{record.metric}={_short(record.value)} anomaly score"
        f" {record.anomaly_score:.3f} >= threshold {record.threshold:.3f}"
    )
    attributes = {
        "edge.metric": record.metric,
        "edge.value": float(record.value),
        "edge.unit": ucum_unit(record.unit) or None,
        "edge.anomaly_score": float(record.anomaly_score),
        "edge.anomaly_threshold": float(record.threshold),
        "edge.detector": record.detector,
    }
    return LogRecord(
        time_unix_nano=_nanos(record.time_ms, "time_ms"),
        severity_number=SEVERITY_NUMBER_WARN,
        severity_text="WARN",
        event_name=ANOMALY_EVENT,
        body=AnyValue(string_value=body),
        attributes=encode_attributes(attributes),
    )


def _decision_log(record: Decision) -> LogRecord:
    body = f"rule {record.rule_id} fired: {record.action} on {record.metric}"
    attributes = {
        "edge.rule_id": record.rule_id,
        "edge.action": record.action,
        "edge.metric": record.metric,
        "edge.priority": record.priority,
        "edge.confidence": float(record.confidence),
        "edge.evidence": record.evidence or None,
        "edge.command": record.command,
    }
    return LogRecord(
        time_unix_nano=_nanos(record.time_ms, "time_ms"),
        observed_time_unix_nano=_nanos(record.decided_at_ms, "decided_at_ms"),
        severity_number=SEVERITY_NUMBER_INFO,
        severity_text="INFO",
        event_name=DECISION_EVENT,
        body=AnyValue(string_value=body),
        attributes=encode_attributes(attributes),
    )


def _fill_resource(resource: Resource, device_id: str, info: ResourceInfo) -> None:
    attributes = {
        "service.name": SERVICE_NAME,
        "service.instance.id": info.service_instance_id,
        "edge.site": info.site,
        "device.id": device_id,
    }
    resource.attributes.extend(encode_attributes(attributes))


def _scope(info: ResourceInfo) -> InstrumentationScope:
    return InstrumentationScope(name=SCOPE_NAME, version=info.service_version)


def _nanos(time_ms: int, field_name: str) -> int:
    if time_ms < 0:
        raise ValueError(
            f"{field_name} must be epoch milliseconds >= 0, got {int(time_ms)}"
        )
    return int(time_ms) * NS_PER_MS


def _short(value: float) -> str:
    return repr(value) if math.isfinite(value) else str(value)


def _json_text(value: Mapping[str, Any]) -> str:
    # Stdlib json, not orjson: it keeps integers beyond 64 bits instead of failing.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


__all__ = [
    "ANOMALY_EVENT",
    "DECISION_EVENT",
    "ResourceInfo",
    "count_log_records",
    "count_metric_points",
    "encode_attributes",
    "encode_logs",
    "encode_metrics",
    "encode_value",
    "metric_points",
    "ucum_unit",
]
