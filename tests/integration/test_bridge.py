"""The MQTT -> Kafka bridge against real Mosquitto and Kafka: nothing is lost."""

from __future__ import annotations

import base64
import time
from collections import defaultdict

import orjson

from streams.config import Settings
from streams.stack import LocalStack
from tests.integration.brokers import (
    STACK_DIR,
    Processes,
    Publisher,
    Record,
    Run,
    consume,
    wait_until,
)

DEVICES = 20


def _payload(device: str, seq: int) -> bytes:
    return orjson.dumps(
        {
            "id": f"{device}:{seq}",
            "seq": seq,
            "time": 1_700_000_000_000 + seq,
            "value": seq,
        }
    )


def _start_bridge(processes: Processes, run: Run, name: str = "bridge") -> None:
    processes.start(name, ["bridge"], run.env())
    wait_until(
        lambda: "MQTT connected" in processes.log(name),
        timeout_s=60,
        what="the bridge to subscribe",
    )


def _ids_by_device(records: list[Record]) -> dict[str, list[int]]:
    by_device: dict[str, list[int]] = defaultdict(list)
    for record in records:
        body = orjson.loads(record.value)
        by_device[record.key.decode()].append(body["seq"])
    return by_device


def _assert_complete_and_ordered(records: list[Record], per_device: int) -> None:
    by_device = _ids_by_device(records)
    assert len(by_device) == DEVICES
    for device, seqs in by_device.items():
        first_seen = list(dict.fromkeys(seqs))  # duplicates from redelivery removed
        assert first_seen == list(range(per_device)), f"{device}: lost or reordered"


def _publish_round_robin(publisher: Publisher, run: Run, seqs: range) -> None:
    for seq in seqs:
        for d in range(DEVICES):
            publisher.publish(
                run.mqtt_topic(f"dev{d:02d}"), _payload(f"dev{d:02d}", seq)
            )


def _unique_count(records: list[Record]) -> int:
    return len({(r.key, r.value) for r in records})


def test_bridge_loses_nothing_when_killed_mid_stream(
    run: Run, processes: Processes
) -> None:
    """kill -9 in the middle of 10,000 QoS 1 publishes from 20 devices, then restart."""
    per_device = 500
    bridge = processes.start("bridge", ["bridge"], run.env())
    wait_until(
        lambda: "MQTT connected" in processes.log("bridge"),
        timeout_s=60,
        what="the bridge to subscribe",
    )
    publisher = Publisher()
    raw = run.topic("telemetry-raw")

    _publish_round_robin(publisher, run, range(per_device // 2))
    wait_until(
        lambda: (
            "produced=" in processes.log("bridge")
            and int(processes.log("bridge").rsplit("produced=", 1)[1].split()[0]) > 1000
        ),
        timeout_s=60,
        what="the bridge to produce a first part",
    )
    processes.kill9(bridge)
    _publish_round_robin(publisher, run, range(per_device // 2, per_device))
    publisher.wait_acked(DEVICES * per_device)
    _start_bridge(processes, run, "bridge2")
    records = consume(
        [raw], until=lambda rs: _unique_count(rs) >= DEVICES * per_device, timeout_s=120
    )
    publisher.close()

    assert _unique_count(records) == DEVICES * per_device
    _assert_complete_and_ordered(records, per_device)
    assert all(r.headers["mqtt_qos"] == b"1" for r in records)
    assert all(
        r.headers["mqtt_topic"].decode() == run.mqtt_topic(r.key.decode())
        for r in records
    )


def _stack() -> LocalStack:
    return LocalStack(Settings(stack_dir=STACK_DIR), say=lambda line: None)


def test_bridge_resubscribes_after_mosquitto_restart(
    run: Run, processes: Processes
) -> None:
    per_device = 50
    _start_bridge(processes, run)
    publisher = Publisher()
    raw = run.topic("telemetry-raw")
    _publish_round_robin(publisher, run, range(per_device))
    publisher.wait_acked(DEVICES * per_device)

    stack = _stack()
    stack.stop_server("mosquitto")
    time.sleep(2)
    stack.start_server("mosquitto")
    wait_until(
        lambda: processes.log("bridge").count("MQTT connected") >= 2,
        timeout_s=60,
        what="the bridge to reconnect",
    )
    wait_until(
        lambda: publisher.client.is_connected(),
        timeout_s=30,
        what="the publisher to reconnect",
    )
    _publish_round_robin(publisher, run, range(per_device, 2 * per_device))
    publisher.wait_acked(2 * DEVICES * per_device)
    records = consume(
        [raw],
        until=lambda rs: _unique_count(rs) >= 2 * DEVICES * per_device,
        timeout_s=60,
    )
    publisher.close()

    assert _unique_count(records) == 2 * DEVICES * per_device
    _assert_complete_and_ordered(records, 2 * per_device)


def test_bridge_holds_messages_while_kafka_is_down_for_30_s(
    run: Run, processes: Processes
) -> None:
    per_device = 100
    _start_bridge(processes, run)
    publisher = Publisher()
    raw = run.topic("telemetry-raw")
    _publish_round_robin(publisher, run, range(per_device // 2))
    stack = _stack()

    stack.stop_server("kafka")
    down_at = time.monotonic()
    _publish_round_robin(publisher, run, range(per_device // 2, per_device))
    publisher.wait_acked(DEVICES * per_device)
    time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
    bridge_alive = processes.started[0].poll() is None
    stack.start_server("kafka")
    records = consume(
        [raw], until=lambda rs: _unique_count(rs) >= DEVICES * per_device, timeout_s=120
    )
    publisher.close()

    assert bridge_alive
    assert _unique_count(records) == DEVICES * per_device
    _assert_complete_and_ordered(records, per_device)


def test_bridge_dead_letters_bad_input_and_keeps_running(
    run: Run, processes: Processes
) -> None:
    env = run.env(
        EDGE_MQTT_TOPIC_PATTERN=f"t{run.id}/devices/dev-{{device_id}}/telemetry"
    )
    processes.start("bridge", ["bridge"], env)
    wait_until(
        lambda: "MQTT connected" in processes.log("bridge"),
        timeout_s=60,
        what="the bridge to subscribe",
    )
    publisher = Publisher()
    topic = f"t{run.id}/devices/dev-a/telemetry"
    not_utf8 = b"\xff\xfe\x00bad"

    publisher.publish(topic, b"")
    publisher.publish(topic, b"x" * (2 * 1024 * 1024))
    publisher.publish(topic, not_utf8)
    publisher.publish(f"t{run.id}/devices/other/telemetry", b'{"value": 1}')
    publisher.publish(topic, b'{"value": 42}')
    publisher.wait_acked(5)
    dead = consume([run.topic("dead-letters")], until=lambda rs: len(rs) >= 3)
    raw = consume([run.topic("telemetry-raw")], until=lambda rs: len(rs) >= 2)
    publisher.close()

    reasons = sorted(orjson.loads(r.value)["reason"] for r in dead)
    documented = {
        "stage", "reason", "source", "device_id", "partition", "offset",
        "received_at_ms", "payload_b64", "truncated", "field",
    }  # fmt: skip
    assert all(set(orjson.loads(r.value)) == documented for r in dead)
    assert len(dead) == 3
    assert (
        reasons[0].startswith("MQTT topic ")
        and "does not match the pattern" in reasons[0]
    )
    assert (
        reasons[1] == "payload is 2097152 bytes, over the limit of 1048576 bytes"
        " (EDGE_BRIDGE_MAX_PAYLOAD_BYTES)"
    )
    assert reasons[2] == "payload is empty (0 bytes)"
    big = next(
        orjson.loads(r.value) for r in dead if "over the limit" in r.value.decode()
    )
    assert big["truncated"] is True and big["device_id"] == "a"
    assert len(base64.b64decode(big["payload_b64"])) == 64 * 1024
    # Bytes that are not UTF-8 are forwarded untouched (the worker judges payloads),
    # and the next valid message arrives after all the bad ones.
    assert [r.value for r in raw] == [not_utf8, b'{"value": 42}']
    assert processes.started[0].poll() is None
    log = processes.log("bridge")
    assert (
        "dead_lettered=3" in log
        or wait_until(
            lambda: "dead_lettered=3" in processes.log("bridge"),
            timeout_s=10,
            what="the summary line to count 3 dead letters",
        )
        is None
    )
