"""The worker's per-message step and its write-back state, without Kafka."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import orjson
import pytest

from models.detectors import DetectorSpec
from models.rules import parse_rules
from models.windows import WindowSpec
from streams.pipeline import Pipeline, PipelineConfig
from streams.tablestore import WriteBackStore

T0 = 1_700_000_040_000  # a minute boundary
NOW = T0 + 3600_000

RULES = """
version: 1
rules:
  - id: hot
    match: {metric: temp}
    when: {field: value, op: '>', threshold: 90}
    priority: 10
    cooldown_s: 600
    action: cool_down
"""


def _pipeline(
    lateness_ms: int = 10_000, idle_close: Literal["clock", "all"] = "clock"
) -> Pipeline:
    config = PipelineConfig(
        window=WindowSpec(
            size_ms=60_000,
            idle_timeout_ms=5_000,
            allowed_lateness_ms=lateness_ms,
            idle_close=idle_close,
        ),
        hopping=None,
        detector=DetectorSpec(),
        detector_by_metric={},
        threshold=0.99,
        threshold_by_metric={},
        max_clock_skew_ms=300_000,
        ruleset=parse_rules(RULES),
    )
    return Pipeline(config, clock_ms=lambda: NOW)


def _raw(pipeline: Pipeline, store: dict[bytes, bytes], body: Any, offset: int,
         received_ms: int = NOW) -> Any:  # fmt: skip
    return pipeline.process_raw(
        device_id="d1",
        payload=body if isinstance(body, bytes) else orjson.dumps(body),
        received_ms=received_ms,
        source="kafka:telemetry-raw",
        partition=0,
        offset=offset,
        store=store,
    )


def test_pipeline_closes_window_when_watermark_passes_end_plus_lateness() -> None:
    pipeline, stores = _pipeline(), {}

    _raw(pipeline, stores, {"time": T0, "temp": 1.0}, 0)
    _raw(pipeline, stores, {"time": T0 + 59_999, "temp": 3.0}, 1)
    early = _raw(pipeline, stores, {"time": T0 + 69_999, "temp": 5.0}, 2)
    closing = _raw(pipeline, stores, {"time": T0 + 70_000, "temp": 7.0}, 3)

    assert early.summaries == []
    [summary] = closing.summaries
    assert (summary.window_start_ms, summary.count, summary.sum, summary.last) == (
        T0,
        2,
        4.0,
        3.0,
    )


def test_pipeline_skips_a_record_replayed_from_an_applied_offset() -> None:
    pipeline, stores = _pipeline(), {}
    _raw(pipeline, stores, {"time": T0, "temp": 95.0}, 7)

    again = _raw(pipeline, stores, {"time": T0, "temp": 95.0}, 7)

    assert again.readings == [] and again.decisions == [] and again.dead_letters == []
    assert pipeline.counters.replayed == 1
    assert pipeline.counters.readings == 1 and pipeline.counters.decisions == 1


def test_pipeline_counts_a_redelivered_reading_once() -> None:
    pipeline, stores = _pipeline(), {}

    _raw(pipeline, stores, {"time": T0, "temp": 95.0}, 1)
    duplicate = _raw(pipeline, stores, {"time": T0, "temp": 95.0}, 2)

    assert duplicate.readings == [] and duplicate.decisions == []
    assert pipeline.counters.duplicates == 1


def test_pipeline_dead_letters_late_reading_with_field_and_reason() -> None:
    pipeline, stores = _pipeline(lateness_ms=0), {}
    _raw(pipeline, stores, {"time": T0 + 120_000, "temp": 1.0}, 1)

    late = _raw(pipeline, stores, {"time": T0, "temp": 2.0}, 2)

    [letter] = late.dead_letters
    assert (letter.stage, letter.field, letter.offset) == ("window", "temp", 2)
    assert letter.reason.startswith(f'reading "temp" at time_ms={T0} is late')


def test_pipeline_keeps_good_metrics_of_a_message_with_a_bad_one() -> None:
    pipeline, stores = _pipeline(), {}

    out = _raw(pipeline, stores, {"time": T0, "temp": 1.0, "rpm": "fast"}, 1)

    assert [r.metric for r in out.readings] == ["temp"]
    [letter] = out.dead_letters
    assert letter.reason == 'field "rpm" must be a finite number, got str "fast"'


def test_pipeline_cooldown_suppresses_the_second_firing() -> None:
    pipeline, stores = _pipeline(), {}

    first = _raw(pipeline, stores, {"time": T0, "temp": 95.0}, 1)
    second = _raw(pipeline, stores, {"time": T0 + 1_000, "temp": 96.0}, 2)

    assert [d.rule_id for d in first.decisions] == ["hot"]
    assert second.decisions == [] and pipeline.counters.suppressed == 1


def test_pipeline_gives_rules_no_anomaly_score_while_the_detector_warms_up() -> None:
    pipeline, stores = _pipeline(), {}

    out = _raw(pipeline, stores, {"time": T0, "temp": 95.0}, 1)

    [decision] = out.decisions
    assert decision.evidence["anomaly_score"] is None


def test_pipeline_rule_on_a_low_anomaly_score_waits_for_the_warm_up() -> None:
    """A warm-up score of 0 is no proof of normal operation."""
    calm = parse_rules(
        "rules:\n  - id: calm\n    action: log\n"
        "    when: {field: anomaly_score, op: '<', threshold: 0.5}\n"
    )
    warming = DetectorSpec(params={"grace_period": 3})
    config = dataclasses.replace(_pipeline().config, detector=warming, ruleset=calm)
    pipeline, stores = Pipeline(config, clock_ms=lambda: NOW), {}

    outs = [_raw(pipeline, stores, {"time": T0 + i, "temp": 20.0}, i) for i in range(4)]

    assert [len(out.decisions) for out in outs] == [0, 0, 0, 1]
    assert outs[3].decisions[0].evidence["anomaly_score"] is not None


def test_pipeline_idle_tick_closes_quiet_series_on_the_bridge_clock() -> None:
    pipeline, stores = _pipeline(idle_close="all"), {}
    _raw(pipeline, stores, {"time": T0, "temp": 1.0}, 1, received_ms=NOW - 10_000)

    too_early = pipeline.close_idle(
        device_id="d1",
        tick_ms=NOW - 6_000,
        store=stores,
    )
    closed = pipeline.close_idle(
        device_id="d1",
        tick_ms=NOW - 5_000,
        store=stores,
    )

    assert too_early.summaries == []
    assert [(s.count, s.closed_by) for s in closed.summaries] == [(1, "idle")]
    assert closed.next_idle_deadline_ms is None


class _Table:
    """The two parts of a Faust table the write-back store uses."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.changelog: list[tuple[int, bytes, bytes]] = []

    def send_changelog(self, partition: int, key: bytes, value: bytes) -> None:
        self.changelog.append((partition, key, value))


def test_write_back_store_writes_each_changed_key_once_on_flush() -> None:
    table = _Table()
    store = WriteBackStore(table)
    store.partition = 3

    store[b"a"] = b"1"
    store[b"a"] = b"2"
    store[b"b"] = b"9"
    before = dict(table.data)
    written = store.flush()

    assert before == {} and store[b"a"] == b"2"
    assert written == 2
    assert table.changelog == [(3, b"a", b"2"), (3, b"b", b"9")]
    assert table.data == {b"a": b"2", b"b": b"9"} and store.dirty_count == 0


def test_write_back_store_discard_drops_unwritten_changes() -> None:
    table = _Table()
    store = WriteBackStore(table)
    store.partition = 0
    store[b"a"] = b"1"

    store.discard()

    assert store.get(b"a") is None and table.changelog == []


def test_write_back_store_refuses_a_write_without_partition() -> None:
    store = WriteBackStore(_Table())

    with pytest.raises(RuntimeError, match="partition"):
        store[b"a"] = b"1"


class _Counted:
    """A state object that counts how often it was encoded."""

    def __init__(self, value: bytes) -> None:
        self.value = value
        self.encoded = 0

    @classmethod
    def decode(cls, raw: bytes | None) -> _Counted:
        return cls(raw or b"")

    def encode(self) -> bytes:
        self.encoded += 1
        return self.value


def test_write_back_store_encodes_a_saved_object_once_per_flush() -> None:
    table = _Table()
    store = WriteBackStore(table)
    store.partition = 1
    obj = store.load(b"a", _Counted.decode)
    for text in (b"x", b"xy", b"xyz"):
        obj.value = text
        store.save(b"a", obj)
        assert store.load(b"a", _Counted.decode) is obj

    store.flush()

    assert obj.encoded == 1
    assert table.changelog == [(1, b"a", b"xyz")]
    assert store.load(b"a", _Counted.decode) is obj  # still cached after the flush


def test_write_back_store_reads_a_dirty_object_as_its_bytes() -> None:
    store = WriteBackStore(_Table())
    store.partition = 0
    obj = _Counted(b"state")
    store.save(b"a", obj)

    assert store[b"a"] == b"state" and sorted(store) == [b"a"]


def test_write_back_store_decodes_table_values_and_skips_missing_keys() -> None:
    table = _Table()
    table.data[b"a"] = b"from-changelog"
    store = WriteBackStore(table)

    assert store.load(b"a", _Counted.decode).value == b"from-changelog"
    assert store.load(b"missing", _Counted.decode).value == b""
    assert store.cached_count == 1


def test_write_back_store_keeps_at_most_max_cached_objects_after_a_flush() -> None:
    table = _Table()
    store = WriteBackStore(table, max_cached=2)
    store.partition = 0
    for key in (b"a", b"b", b"c"):
        store.save(key, _Counted(key))

    store.flush()

    assert store.cached_count == 2
    # An evicted key is decoded again from the table.
    assert store.load(b"a", _Counted.decode).value == b"a"


def test_write_back_store_forgets_objects_when_partitions_change_hands() -> None:
    table = _Table()
    store = WriteBackStore(table)
    store.partition = 0
    store.save(b"a", _Counted(b"mine"))
    store.flush()
    table.data[b"a"] = b"written-by-the-next-owner"

    store.forget_objects()

    assert store.load(b"a", _Counted.decode).value == b"written-by-the-next-owner"


def test_pipeline_gives_the_same_outputs_on_a_write_back_store_as_on_a_dict() -> None:
    readings = [
        {"time": T0 + i * 7_000, "temp": 50.0 + (i % 5) + (60.0 if i == 40 else 0.0)}
        for i in range(60)
    ]
    plain, cached = _pipeline(), _pipeline()
    store_dict: dict[bytes, bytes] = {}
    table = _Table()
    store = WriteBackStore(table, max_cached=1)
    store.partition = 0
    outs_dict, outs_cached = [], []
    for offset, body in enumerate(readings):
        outs_dict.append(_raw(plain, store_dict, body, offset))
        outs_cached.append(_raw(cached, store, body, offset))  # type: ignore[arg-type]
        if offset % 7 == 0:
            store.flush()
            store.forget_objects()
    store.flush()

    assert outs_cached == outs_dict
    assert sum(len(o.decisions) for o in outs_dict) == 1
    assert sum(len(o.summaries) for o in outs_dict) == 6
    assert table.data == store_dict


def test_readings_of_metrics_beyond_the_series_limit_are_dead_lettered_once() -> None:
    base = _pipeline()
    pipeline = Pipeline(
        dataclasses.replace(base.config, max_series_per_device=3),
        clock_ms=lambda: NOW,
    )
    stores: dict[bytes, bytes] = {}
    _raw(pipeline, stores, {"time": T0, "a": 1.0, "b": 2.0}, 0)

    out = _raw(
        pipeline, stores, {"time": T0 + 1000, "a": 1.5, "c": 3.0, "d": 4.0, "e": 5.0}, 1
    )

    assert sorted(r.metric for r in out.readings) == ["a", "c"]
    [letter] = out.dead_letters
    assert (letter.stage, letter.field) == ("normalize", "d")
    assert letter.reason == (
        'device "d1" already has 3 series, the most a device may have'
        ' (EDGE_MAX_SERIES_PER_DEVICE); readings of new metrics are refused: "d", "e"'
    )
    assert pipeline.counters.rejected == 2


def test_a_series_idle_while_its_device_sends_other_metrics_closes_on_its_clock() -> (
    None
):
    pipeline, store = _pipeline(idle_close="all"), WriteBackStore(_Table())
    store.partition = 0
    _raw(pipeline, store, {"time": T0, "temp": 1.0, "rpm": 5.0}, 0, received_ms=NOW)  # type: ignore[arg-type]
    quiet = _raw(
        pipeline, store, {"time": T0 + 2_000, "temp": 2.0}, 1, received_ms=NOW + 4_999
    )  # type: ignore[arg-type]

    later = _raw(
        pipeline, store, {"time": T0 + 3_000, "temp": 3.0}, 2, received_ms=NOW + 5_000
    )  # type: ignore[arg-type]

    assert quiet.summaries == []
    assert [(s.metric, s.count, s.closed_by) for s in later.summaries] == [
        ("rpm", 1, "idle")
    ]


def test_device_that_pauses_past_the_idle_timeout_keeps_its_window_and_decides() -> (
    None
):
    """A live device silent longer than the idle timeout: nothing late, rules run."""
    pipeline, stores = _pipeline(), {}
    _raw(
        pipeline,
        stores,
        {"time": NOW - 50_000, "temp": 20.0},
        1,
        received_ms=NOW - 50_000,
    )

    tick = pipeline.close_idle(device_id="d1", tick_ms=NOW - 20_000, store=stores)
    hot = _raw(pipeline, stores, {"time": NOW, "temp": 99.0}, 2, received_ms=NOW)

    assert tick.summaries == []
    assert hot.dead_letters == [] and pipeline.counters.late == 0
    assert [d.rule_id for d in hot.decisions] == ["hot"]


def test_a_replayed_record_does_not_dead_letter_its_bad_parts_again() -> None:
    pipeline, stores = _pipeline(), {}
    body = {"time": T0, "temp": "hot", "rpm": 5.0}

    first = _raw(pipeline, stores, body, 7)
    again = _raw(pipeline, stores, body, 7)

    assert [letter.field for letter in first.dead_letters] == ["temp"]
    assert again.dead_letters == [] and again.readings == []
    counters = pipeline.counters
    assert (counters.rejected, counters.dead_lettered, counters.replayed) == (1, 1, 1)


def test_a_payload_of_thousands_of_bad_parts_makes_twenty_dead_letters() -> None:
    pipeline, stores = _pipeline(), {}

    out = _raw(pipeline, stores, b"[" + b",".join([b"1"] * 5000) + b"]", 1)

    assert len(out.dead_letters) == 20
    assert out.dead_letters[-1].field == "payload"
    assert out.dead_letters[-1].reason.startswith("4981 more parts of this payload")
    assert pipeline.counters.rejected == 5000
    assert pipeline.counters.dead_lettered == 20


def test_attributes_too_large_are_refused_and_the_readings_go_on() -> None:
    pipeline, stores = _pipeline(), {}
    body = {"time": T0, "temp": 20.0, "attributes": {"blob": "x" * 20_000}}

    out = _raw(pipeline, stores, body, 1)

    assert [r.attributes for r in out.readings] == [{}]
    [letter] = out.dead_letters
    assert letter.field == "attributes"
    assert "at most 16384 bytes as JSON, got 20011 bytes" in letter.reason
