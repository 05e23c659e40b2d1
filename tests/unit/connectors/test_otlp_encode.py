from __future__ import annotations

import json

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.logs.v1.logs_pb2 import (
    SEVERITY_NUMBER_INFO,
    SEVERITY_NUMBER_WARN,
)

from connectors.otlp.encode import (
    ResourceInfo,
    count_log_records,
    count_metric_points,
    encode_attributes,
    encode_logs,
    encode_metrics,
    encode_value,
    ucum_unit,
)
from models.records import AnomalyScore, Decision, WindowSummary

INFO = ResourceInfo(service_instance_id="edge-a", site="plant-7", service_version="1.2")


def summary(device_id: str = "press-1", metric: str = "temperature", **kw):
    values = dict(
        window_start_ms=1_700_000_000_000,
        window_end_ms=1_700_000_060_000,
        count=4,
        sum=10.0,
        min=1.0,
        max=4.0,
        mean=2.5,
        last=4.0,
        p50=2.5,
        p95=3.9,
        p99=3.99,
        unit="°C",
    )
    values.update(kw)
    return WindowSummary(device_id=device_id, metric=metric, **values)


def attrs(pairs) -> dict:
    return {kv.key: _plain(kv.value) for kv in pairs}


def _plain(value: AnyValue):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_plain(v) for v in value.array_value.values]
    if kind is None:
        return None
    return getattr(value, kind)


def roundtrip_metrics(request) -> ExportMetricsServiceRequest:
    return ExportMetricsServiceRequest.FromString(request.SerializeToString())


def roundtrip_logs(request) -> ExportLogsServiceRequest:
    return ExportLogsServiceRequest.FromString(request.SerializeToString())


def test_encode_metrics_maps_summary_to_exact_values_and_window_bounds():
    request = roundtrip_metrics(encode_metrics([summary()], resource_info=INFO))

    metric = request.resource_metrics[0].scope_metrics[0].metrics[0]
    point = metric.summary.data_points[0]
    assert metric.name == "temperature"
    assert metric.unit == "Cel"
    assert point.start_time_unix_nano == 1_700_000_000_000_000_000
    assert point.time_unix_nano == 1_700_000_060_000_000_000
    assert point.count == 4
    assert point.sum == 10.0
    quantiles = [(q.quantile, q.value) for q in point.quantile_values]
    assert quantiles == [(0.0, 1.0), (0.5, 2.5), (0.95, 3.9), (0.99, 3.99), (1.0, 4.0)]
    assert list(point.attributes) == []


def test_encode_metrics_groups_by_device_resource_and_series():
    summaries = [
        summary("press-1", "temperature"),
        summary("press-2", "temperature"),
        summary("press-1", "temperature", window_start_ms=1_700_000_060_000,
                window_end_ms=1_700_000_120_000),
        summary("press-1", "pressure", unit="kPa"),
    ]  # fmt: skip

    request = roundtrip_metrics(encode_metrics(summaries, resource_info=INFO))

    assert len(request.resource_metrics) == 2
    first, second = request.resource_metrics
    assert attrs(first.resource.attributes) == {
        "service.name": "edge-otlp",
        "service.instance.id": "edge-a",
        "edge.site": "plant-7",
        "device.id": "press-1",
    }
    assert attrs(second.resource.attributes)["device.id"] == "press-2"
    assert len(first.scope_metrics) == 1
    scope = first.scope_metrics[0]
    assert (scope.scope.name, scope.scope.version) == ("edge-otlp", "1.2")
    names = [(m.name, m.unit, len(m.summary.data_points)) for m in scope.metrics]
    assert names == [("temperature", "Cel", 2), ("pressure", "kPa", 1)]
    assert count_metric_points(request) == 4


def test_encode_metrics_marks_hopping_windows_only():
    request = encode_metrics([summary(kind="hopping")], resource_info=INFO)

    point = (
        request.resource_metrics[0].scope_metrics[0].metrics[0].summary.data_points[0]
    )
    assert attrs(point.attributes) == {"edge.window.kind": "hopping"}


def test_encode_metrics_rejects_negative_window_start():
    with pytest.raises(ValueError, match="window_start_ms"):
        encode_metrics([summary(window_start_ms=-1)], resource_info=INFO)


def test_encode_metrics_of_nothing_is_an_empty_request():
    assert encode_metrics([], resource_info=INFO).ByteSize() == 0


@pytest.mark.parametrize(
    ("unit", "expected"),
    [("°C", "Cel"), ("C", "Cel"), ("%", "%"), ("kWh", "kW.h"), ("rpm", "1/min"),
     ("m/s", "m/s"), ("furlong", "furlong"), (None, ""), ("  ", "")],
)  # fmt: skip
def test_ucum_unit_maps_common_units_and_passes_others_through(unit, expected):
    assert ucum_unit(unit) == expected


def test_encode_value_maps_each_type_explicitly():
    assert encode_value("x") == AnyValue(string_value="x")
    assert encode_value(True) == AnyValue(bool_value=True)
    assert encode_value(7) == AnyValue(int_value=7)
    assert encode_value(2.5) == AnyValue(double_value=2.5)
    assert encode_value(b"\x00") == AnyValue(bytes_value=b"\x00")
    assert encode_value(None) is None


def test_encode_value_keeps_int64_bounds_and_turns_larger_ints_into_text():
    assert encode_value(2**63 - 1) == AnyValue(int_value=2**63 - 1)
    assert encode_value(-(2**63)) == AnyValue(int_value=-(2**63))
    assert encode_value(2**63) == AnyValue(string_value=str(2**63))
    assert encode_value(-(2**63) - 1) == AnyValue(string_value=str(-(2**63) - 1))


def test_encode_value_maps_lists_to_arrays_and_dicts_to_json_text():
    nested = {"b": {"c": [1, 2**70]}, "a": None}

    array = encode_value([1, "two", 3.0, None, [False]])
    text = encode_value(nested)

    assert _plain(array) == [1, "two", 3.0, None, [False]]
    assert text.string_value == '{"a":null,"b":{"c":[1,1180591620717411303424]}}'
    assert json.loads(text.string_value) == nested


def test_encode_attributes_drops_none_and_keeps_order():
    pairs = encode_attributes({"z": 1, "gone": None, "a": "x"})

    assert [kv.key for kv in pairs] == ["z", "a"]


def test_encode_logs_maps_anomaly_to_warn_event_with_attributes():
    anomaly = AnomalyScore(
        device_id="press-1", metric="temperature", time_ms=1_700_000_000_123,
        value=97.5, anomaly_score=0.97, threshold=0.9, detector="hst", unit="C",
    )  # fmt: skip

    request = roundtrip_logs(encode_logs([anomaly], resource_info=INFO))

    record = request.resource_logs[0].scope_logs[0].log_records[0]
    assert record.time_unix_nano == 1_700_000_000_123_000_000
    assert record.severity_number == SEVERITY_NUMBER_WARN
    assert record.severity_text == "WARN"
    assert record.event_name == "edge.anomaly"
    assert "temperature" in record.body.string_value
    assert attrs(record.attributes) == {
        "edge.metric": "temperature",
        "edge.value": 97.5,
        "edge.unit": "Cel",
        "edge.anomaly_score": 0.97,
        "edge.anomaly_threshold": 0.9,
        "edge.detector": "hst",
    }


def test_encode_logs_maps_decision_with_evidence_as_json_and_observed_time():
    decision = Decision(
        rule_id="overheat", device_id="press-2", metric="temperature", action="stop",
        priority=2, confidence=0.8, time_ms=1_700_000_000_000,
        decided_at_ms=1_700_000_000_004, evidence={"max": 99.0, "tags": ["a"]},
    )  # fmt: skip

    request = roundtrip_logs(encode_logs([decision], resource_info=INFO))

    resource = request.resource_logs[0]
    record = resource.scope_logs[0].log_records[0]
    assert attrs(resource.resource.attributes)["device.id"] == "press-2"
    assert record.severity_number == SEVERITY_NUMBER_INFO
    assert record.event_name == "edge.decision"
    assert record.observed_time_unix_nano == 1_700_000_000_004_000_000
    assert attrs(record.attributes) == {
        "edge.rule_id": "overheat",
        "edge.action": "stop",
        "edge.metric": "temperature",
        "edge.priority": 2,
        "edge.confidence": 0.8,
        "edge.evidence": '{"max":99.0,"tags":["a"]}',
    }


def test_encode_logs_groups_mixed_records_by_device_in_order():
    records = [
        AnomalyScore("d1", "m", 1, 1.0, 0.95, 0.9, "hst"),
        Decision("r", "d2", "m", "stop", 1, 1.0, 2, 3),
        Decision("r", "d1", "m", "stop", 1, 1.0, 4, 5),
    ]

    request = encode_logs(records, resource_info=INFO)

    assert len(request.resource_logs) == 2
    d1 = request.resource_logs[0].scope_logs[0].log_records
    assert [r.event_name for r in d1] == ["edge.anomaly", "edge.decision"]
    assert count_log_records(request) == 3
