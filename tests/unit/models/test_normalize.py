"""Tests of normalize_payload: every payload form and every rejection."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from models.normalize import (
    MIN_TIME_MS,
    NormalizeResult,
    Rejection,
    RejectionKind,
    normalize_payload,
    parse_time_ms,
)
from models.records import Reading

NOW_MS = 1_714_564_800_000  # 2024-05-01T12:00:00Z
RECEIVED_MS = NOW_MS - 250
SKEW_MS = 60_000


def normalize(payload: bytes) -> NormalizeResult:
    return normalize_payload(
        payload,
        device_id="press-7",
        received_ms=RECEIVED_MS,
        now_ms=NOW_MS,
        max_clock_skew_ms=SKEW_MS,
    )


def reading(
    metric: str,
    value: float,
    time_ms: int = NOW_MS,
    unit: str | None = None,
    attributes: dict[str, str] | None = None,
) -> Reading:
    return Reading("press-7", metric, value, time_ms, unit, dict(attributes or {}))


def fields(result: NormalizeResult) -> list[tuple[str, RejectionKind]]:
    return [(r.field, r.kind) for r in result.rejections]


RECEIVED = {"edge.time_source": "received"}


def test_flat_object_gives_one_reading_per_metric() -> None:
    result = normalize(b'{"time": 1714564800, "temperature": 71.2, "rpm": 1200}')

    assert result.readings == [reading("temperature", 71.2), reading("rpm", 1200.0)]
    assert result.rejections == []


def test_metrics_object_takes_units_unit_and_attributes() -> None:
    payload = (
        b'{"ts": 1714564800000, "metrics": {"temperature": 71.2, "rpm": 1200},'
        b' "units": {"temperature": "Cel"}, "unit": "1/min",'
        b' "attributes": {"site": "plant-3", "line": 2}}'
    )

    result = normalize(payload)

    attributes = {"site": "plant-3", "line": 2}
    assert result.readings == [
        Reading("press-7", "temperature", 71.2, NOW_MS, "Cel", attributes),
        Reading("press-7", "rpm", 1200.0, NOW_MS, "1/min", attributes),
    ]
    assert result.rejections == []


def test_metrics_list_items_carry_their_own_unit_and_time() -> None:
    payload = (
        b'{"timestamp": "2024-05-01T12:00:00Z", "metrics": ['
        b'{"name": "temperature", "value": 71.2, "unit": "Cel"},'
        b'{"name": "rpm", "value": 1200, "time": 1714564799}]}'
    )

    result = normalize(payload)

    assert result.readings == [
        reading("temperature", 71.2, unit="Cel"),
        reading("rpm", 1200.0, NOW_MS - 1000),
    ]


def test_readings_share_no_attribute_dict() -> None:
    result = normalize(b'{"time": 1714564800, "a": 1, "b": 2, "attributes": {"x": 1}}')

    first, second = result.readings
    assert first.attributes == second.attributes == {"x": 1}
    assert first.attributes is not second.attributes


def test_missing_time_takes_receive_time_and_says_so() -> None:
    result = normalize(b'{"temperature": 71.2}')

    assert result.readings == [
        reading("temperature", 71.2, RECEIVED_MS, None, RECEIVED)
    ]


def test_bare_number_becomes_default_metric_at_receive_time() -> None:
    result = normalize(b"21.5")

    assert result.readings == [reading("value", 21.5, RECEIVED_MS, None, RECEIVED)]


def test_senml_pack_resolves_base_fields() -> None:
    payload = (
        b'[{"bver": 10, "bn": "urn:dev:mac:0024befffe804ff1:", "bt": 1714564800,'
        b' "bu": "Cel", "n": "temp", "v": 20.5},'
        b'{"n": "humidity", "u": "%RH", "v": 41, "t": -1},'
        b'{"bv": 100, "n": "pressure", "v": 1.25, "t": 0.5}]'
    )

    result = normalize(payload)

    name = "urn:dev:mac:0024befffe804ff1:"
    assert result.readings == [
        reading(name + "temp", 20.5, NOW_MS, "Cel"),
        reading(name + "humidity", 41.0, NOW_MS - 1000, "%RH"),
        reading(name + "pressure", 101.25, NOW_MS + 500, "Cel"),
    ]
    assert result.rejections == []


def test_senml_relative_time_counts_from_receive_time() -> None:
    result = normalize(b'[{"n": "temp", "v": 20, "t": -5}, {"n": "rpm", "v": 3}]')

    assert result.readings == [
        reading("temp", 20.0, RECEIVED_MS - 5000),
        reading("rpm", 3.0, RECEIVED_MS, None, RECEIVED),
    ]


def test_senml_string_bool_and_data_values_are_rejected_by_field() -> None:
    payload = (
        b'[{"bn": "dev:", "bt": 1714564800, "n": "state", "vs": "on"},'
        b'{"n": "door", "vb": true}, {"n": "blob", "vd": "AA"}, {"n": "t", "v": 1}]'
    )

    result = normalize(payload)

    assert result.readings == [reading("dev:t", 1.0)]
    assert fields(result) == [
        ("[0].vs", RejectionKind.UNSUPPORTED_VALUE),
        ("[1].vb", RejectionKind.UNSUPPORTED_VALUE),
        ("[2].vd", RejectionKind.UNSUPPORTED_VALUE),
    ]
    assert result.rejections[0].reason == (
        'field "[0].vs" must be a numeric "v" value: string, boolean and data '
        "values are not supported, got vs"
    )


def test_senml_newer_version_rejects_the_pack() -> None:
    result = normalize(b'[{"bver": 11, "n": "t", "v": 1}, {"n": "u", "v": 2}]')

    assert result.readings == []
    assert fields(result) == [("[0].bver", RejectionKind.INVALID_FIELD)]


@pytest.mark.parametrize(
    "time",
    [
        b"1714564800.25",
        b"1714564800250",
        b"1714564800250.0",
        b"1714564800250000",
        b"1714564800250000999",
        b'"2024-05-01T12:00:00.25Z"',
        b'"2024-05-01T12:00:00.250999999Z"',
        b'"2024-05-01T14:30:00.250+02:30"',
        b'"2024-05-01 10:00:00.250-02:00"',
    ],
)
def test_one_instant_in_every_time_form_gives_the_same_time_ms(time: bytes) -> None:
    result = normalize(b'{"time": ' + time + b', "rpm": 1}')

    assert result.readings == [reading("rpm", 1.0, NOW_MS + 250)]


def test_parse_time_ms_raises_value_error_with_the_reason() -> None:
    with pytest.raises(ValueError, match='field "t" must be RFC 3339 text'):
        parse_time_ms("t", "yesterday", now_ms=NOW_MS, max_clock_skew_ms=0)


@pytest.mark.parametrize(
    ("payload", "kind", "reason"),
    [
        (
            b"",
            RejectionKind.EMPTY,
            'field "payload" must be a JSON document, got an empty payload',
        ),
        (
            b'"hello"',
            RejectionKind.INVALID_PAYLOAD,
            'field "payload" must be a JSON object, a SenML array or a number,'
            ' got str "hello"',
        ),
        (
            b"null",
            RejectionKind.INVALID_PAYLOAD,
            'field "payload" must be a JSON object, a SenML array or a number, '
            "got null",
        ),
        (
            b"true",
            RejectionKind.INVALID_PAYLOAD,
            'field "payload" must be a JSON object, a SenML array or a number, '
            "got bool true",
        ),
        (
            b"[]",
            RejectionKind.INVALID_PAYLOAD,
            'field "payload" must be a non-empty SenML pack, got array',
        ),
        (
            b'{"time": 1714564800}',
            RejectionKind.INVALID_PAYLOAD,
            'field "payload" must carry at least one metric, got none',
        ),
    ],
)
def test_unusable_payload_is_rejected_whole(
    payload: bytes, kind: RejectionKind, reason: str
) -> None:
    result = normalize(payload)

    assert result.readings == []
    assert result.rejections == [Rejection("payload", reason, kind)]


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b'{"time": 1714564800, "rpm": 1', RejectionKind.INVALID_JSON),
        (b'{"rpm": NaN, "temp": 1}', RejectionKind.INVALID_JSON),
        (b'{"rpm": Infinity, "temp": 1}', RejectionKind.INVALID_JSON),
        (b'{"rpm": -Infinity}', RejectionKind.INVALID_JSON),
        (b'{"rpm": 1e400}', RejectionKind.INVALID_JSON),
        (b'{"rpm": 1, "name": "\xff\xfe"}', RejectionKind.INVALID_UTF8),
    ],
)
def test_undecodable_payload_is_rejected_whole(
    payload: bytes, kind: RejectionKind
) -> None:
    result = normalize(payload)

    assert result.readings == []
    assert fields(result) == [("payload", kind)]
    assert result.rejections[0].reason.startswith('field "payload" must be ')


def test_number_as_string_is_rejected_and_other_metrics_survive() -> None:
    result = normalize(b'{"time": 1714564800, "rpm": "1200", "temp": 71.2}')

    assert result.readings == [reading("temp", 71.2)]
    assert result.rejections == [
        Rejection(
            "rpm",
            'field "rpm" must be a finite number, got str "1200"',
            RejectionKind.INVALID_VALUE,
        )
    ]


@pytest.mark.parametrize(
    ("payload", "field", "got"),
    [
        (b'{"metrics": {"rpm": true, "t": 1}}', "metrics.rpm", "bool true"),
        (b'{"metrics": {"rpm": null, "t": 1}}', "metrics.rpm", "null"),
        (b'{"metrics": {"rpm": [1], "t": 1}}', "metrics.rpm", "array"),
        (b'{"metrics": {"rpm": {"v": 1}, "t": 1}}', "metrics.rpm", "object"),
        (b'{"metrics": [{"name": "rpm", "value": "1"}, {"name": "t", "value": 1}]}',
         "metrics[0].value", 'str "1"'),
        (b'[{"n": "rpm", "v": "1"}, {"n": "t", "v": 1}]', "[0].v", 'str "1"'),
    ],
)  # fmt: skip
def test_non_number_value_is_rejected_by_path_and_other_metrics_survive(
    payload: bytes, field: str, got: str
) -> None:
    result = normalize(payload)

    assert [r.metric for r in result.readings] == ["t"]
    assert [r.reason for r in result.rejections] == [
        f'field "{field}" must be a finite number, got {got}'
    ]


def test_integer_beyond_2_64_is_rejected_while_other_metrics_survive() -> None:
    """orjson reads such literals as rounded floats; the lost digits are refused."""
    result = normalize(
        b'{"time": 1714564800, "bytes": 18446744073709551617, "rpm": 1200}'
    )

    assert result.readings == [reading("rpm", 1200.0)]
    assert [r.reason for r in result.rejections] == [
        'field "bytes" must be a number of magnitude below 2^64, got float 1.84467e+19'
    ]


def test_integer_time_beyond_2_64_is_rejected() -> None:
    result = normalize(b'{"time": 123456789012345678901, "rpm": 1}')

    assert result.readings == []
    assert result.rejections == [
        Rejection(
            "time",
            'field "time" must be epoch time in s, ms, µs or ns (below 1e20), '
            "got float 1.2345678901234568e+20",
            RejectionKind.INVALID_TIME,
        )
    ]


@pytest.mark.parametrize(
    ("time", "kind", "expected", "got"),
    [
        (b"12", RejectionKind.TIME_OUT_OF_RANGE,
         "at or after 2000-01-01T00:00:00Z", "int 12"),
        (b"-1714564800", RejectionKind.TIME_OUT_OF_RANGE,
         "at or after 2000-01-01T00:00:00Z", "int -1714564800"),
        (b"1714564861", RejectionKind.TIME_OUT_OF_RANGE,
         "at most 60000 ms after the worker's clock", "int 1714564861"),
        (b'"2024-05-01T12:00:00"', RejectionKind.INVALID_TIME,
         "RFC 3339 text with Z or a UTC offset", 'str "2024-05-01T12:00:00"'),
        (b'"2024-02-30T12:00:00Z"', RejectionKind.INVALID_TIME,
         "a valid calendar date and time (no leap second)",
         'str "2024-02-30T12:00:00Z"'),
        (b'"yesterday"', RejectionKind.INVALID_TIME,
         "RFC 3339 text such as 2024-05-01T12:00:00Z", 'str "yesterday"'),
        (b"true", RejectionKind.INVALID_TIME,
         "epoch time as a number or RFC 3339 text", "bool true"),
        (b"null", RejectionKind.INVALID_TIME,
         "epoch time as a number or RFC 3339 text", "null"),
    ],
)  # fmt: skip
def test_bad_message_time_rejects_every_metric(
    time: bytes, kind: RejectionKind, expected: str, got: str
) -> None:
    result = normalize(b'{"time": ' + time + b', "rpm": 1, "temp": 2}')

    assert result.readings == []
    reason = f'field "time" must be {expected}, got {got}'
    assert result.rejections == [Rejection("time", reason, kind)]


def test_time_at_2000_and_at_the_skew_limit_is_accepted() -> None:
    payload = (
        b'{"metrics": [{"name": "old", "value": 1, "time": 946684800000},'
        b'{"name": "new", "value": 2, "time": 1714564860000},'
        b'{"name": "late", "value": 3, "time": 1714564860001}]}'
    )

    result = normalize(payload)

    assert result.readings == [
        reading("old", 1.0, MIN_TIME_MS),
        reading("new", 2.0, NOW_MS + SKEW_MS),
    ]
    assert fields(result) == [("metrics[2].time", RejectionKind.TIME_OUT_OF_RANGE)]


def test_item_time_replaces_receive_time_without_the_attribute() -> None:
    payload = b'{"metrics": [{"name": "rpm", "value": 1, "time": 1714564800}]}'

    result = normalize(payload)

    assert result.readings == [reading("rpm", 1.0)]


def test_two_time_fields_reject_the_message() -> None:
    result = normalize(b'{"time": 1714564800, "ts": 1714564800, "rpm": 1}')

    assert result.readings == []
    assert result.rejections == [
        Rejection(
            "ts",
            'field "ts" must not be given together with "time"',
            RejectionKind.INVALID_FIELD,
        )
    ]


def test_duplicated_metric_key_is_rejected_and_other_metrics_survive() -> None:
    result = normalize(b'{"time":1714564800,"rpm":1,"temp":2,"rpm":3}')

    assert result.readings == [reading("temp", 2.0)]
    assert result.rejections == [
        Rejection(
            "rpm",
            'field "rpm" must appear once, got it several times',
            RejectionKind.DUPLICATE_KEY,
        )
    ]


def test_duplicated_key_is_found_despite_spaces_before_colons() -> None:
    result = normalize(b'{"time" : 1714564800, "metrics" : {"rpm" : 1, "rpm" : 3}}')

    assert result.readings == []
    assert fields(result) == [("metrics.rpm", RejectionKind.DUPLICATE_KEY)]


def test_duplicated_time_key_rejects_the_message() -> None:
    result = normalize(b'{"time":1714564800,"rpm":1,"time":1714564799}')

    assert result.readings == []
    assert fields(result) == [("time", RejectionKind.DUPLICATE_KEY)]


def test_duplicated_key_in_senml_record_rejects_that_record() -> None:
    payload = b'[{"bt":1714564800,"n":"a","v":1},{"n":"b","v":2,"v":3},{"n":"c","v":4}]'

    result = normalize(payload)

    assert [r.metric for r in result.readings] == ["a", "c"]
    assert fields(result) == [("[1]", RejectionKind.DUPLICATE_KEY)]


def test_colon_inside_string_value_is_no_duplicate() -> None:
    result = normalize(b'{"time":1714564800,"rpm":1,"attributes":{"note":"a\\":b"}}')

    assert result.readings == [reading("rpm", 1.0, attributes={"note": 'a":b'})]
    assert result.rejections == []


@pytest.mark.parametrize(
    ("payload", "field", "kind"),
    [
        (b'{"": 1, "t": 1}', "", RejectionKind.INVALID_NAME),
        (b'{"a\\u0007b": 1, "t": 1}', "a\x07b", RejectionKind.INVALID_NAME),
        (b'{"' + b"x" * 129 + b'": 1, "t": 1}', "x" * 129, RejectionKind.INVALID_NAME),
        (b'{"metrics": [{"name": 5, "value": 1}, {"name": "t", "value": 1}]}',
         "metrics[0].name", RejectionKind.INVALID_NAME),
        (b'{"metrics": [7, {"name": "t", "value": 1}]}',
         "metrics[0]", RejectionKind.INVALID_FIELD),
        (b'{"units": {"rpm": 5}, "rpm": 1, "t": 1}', "units.rpm",
         RejectionKind.INVALID_FIELD),
        (b'{"attributes": {"site": null}, "t": 1}', "attributes.site",
         RejectionKind.INVALID_FIELD),
        (b'{"attributes": [1], "t": 1}', "attributes", RejectionKind.INVALID_FIELD),
    ],
)  # fmt: skip
def test_bad_part_is_rejected_by_path_and_metric_t_survives(
    payload: bytes, field: str, kind: RejectionKind
) -> None:
    result = normalize(payload)

    assert [r.metric for r in result.readings] == ["t"]
    assert fields(result) == [(field, kind)]


def test_metric_name_of_128_chars_is_accepted() -> None:
    name = "m" * 128

    result = normalize(b'{"' + name.encode() + b'": 1}')

    assert [r.metric for r in result.readings] == [name]


def test_a_document_nested_too_deep_is_refused_whole_without_recursion() -> None:
    payload = b"[" * 1000 + b"]" * 1000

    result = normalize(payload)

    assert result.readings == []
    assert result.rejections == [
        Rejection(
            "payload",
            'field "payload" must nest objects and arrays at most 32 levels deep,'
            " got 1000",
            RejectionKind.INVALID_PAYLOAD,
        )
    ]


def test_deep_attributes_are_refused_before_they_reach_serialisation() -> None:
    attributes: Any = "leaf"
    for _ in range(200):
        attributes = [attributes]
    payload = orjson.dumps({"time": 1714564800, "x": 1.0, "attributes": attributes})

    result = normalize(payload)

    assert result.readings == []
    assert [r.kind for r in result.rejections] == [RejectionKind.INVALID_PAYLOAD]
    assert "got 201" in result.rejections[0].reason  # the object and 200 arrays


def test_a_payload_with_too_many_readings_is_refused_whole() -> None:
    body = {"time": 1714564800, **{f"m{i}": float(i) for i in range(1001)}}

    result = normalize(orjson.dumps(body))

    assert result.readings == []
    assert result.rejections == [
        Rejection(
            "payload",
            'field "payload" must carry at most 1000 readings, got 1001',
            RejectionKind.INVALID_PAYLOAD,
        )
    ]


def test_a_utc_offset_beyond_23_59_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be a UTC offset of at most 23:59"):
        parse_time_ms(
            "t", "2024-01-01T00:00:00+99:99", now_ms=NOW_MS, max_clock_skew_ms=0
        )
