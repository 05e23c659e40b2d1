"""The Faust worker against real Mosquitto, bridge and Kafka: exact and durable."""

from __future__ import annotations

import math
import random
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt

from models.detectors import DEFAULT_THRESHOLD, DetectorSpec
from streams.app import GapDetector
from streams.config import Settings
from streams.scorecsv import score_csv
from streams.stack import LocalStack
from tests.integration.brokers import (
    MQTT_HOST,
    MQTT_PORT,
    PROJECT_ROOT,
    STACK_DIR,
    Processes,
    Publisher,
    Record,
    Run,
    consume,
    wait_until,
)

WINDOW_MS = 60_000
LATENESS_S = 30
IDLE_TIMEOUT_S = "3"  # bridge (idle ticks) and worker alike
# Event times three hours back: inside the clock-skew limit, clear of "now".
T0 = (int(time.time() * 1000) - 3 * 3600_000) // WINDOW_MS * WINDOW_MS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Worker:
    """One worker subprocess and its web port."""

    def __init__(self, processes: Processes, run: Run, name: str, env: dict[str, str]):
        self.processes = processes
        self.name = name
        self.port = _free_port()
        settings = {
            "EDGE_WEB_PORT": str(self.port),
            "EDGE_WORKER_ID": name,
            "EDGE_DATA_DIR": str(processes.log_dir / "worker-data"),
            "EDGE_EXPORT_ENABLED": "false",
            "EDGE_WINDOW_SIZE_S": str(WINDOW_MS // 1000),
            "EDGE_ALLOWED_LATENESS_S": str(LATENESS_S),
            "EDGE_IDLE_TIMEOUT_S": IDLE_TIMEOUT_S,
            "EDGE_KAFKA_SESSION_TIMEOUT_S": "6",
        }
        self.env = run.env(**{**settings, **env})
        self.restarts = 0
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        return self.processes.start(self.name, ["worker"], self.env)

    def restart(self) -> None:
        self.process = self._start()

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2.0)

    def ready(self) -> bool:
        # Like the compose restart policy: a worker that exited with 75 (it saw
        # records skipped by the consumer) is started again.
        if self.process.poll() == GapDetector.EXIT_CODE:
            self.restarts += 1
            self.restart()
        try:
            return self.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = 90) -> None:
        wait_until(self.ready, timeout_s=timeout_s, what=f"worker {self.name} ready")

    def counters(self) -> dict[str, Any]:
        return dict(self.get("/counters").json())


def _owns_partitions(worker: Worker) -> bool:
    try:
        body = worker.get("/health").json()
    except (httpx.HTTPError, ValueError):
        return False
    # Some but not all of telemetry-raw's 4 partitions (EDGE_PARTITIONS default).
    return bool(body.get("ready")) and 0 < body["assigned_partitions"] < 4


def _start_pipeline(
    processes: Processes, run: Run, workers: int = 1, **env: str
) -> list[Worker]:
    # The bridge sends idle ticks until the worker's windows can be over: it
    # reads the same window settings.
    windows = {
        "EDGE_IDLE_TIMEOUT_S": IDLE_TIMEOUT_S,
        "EDGE_WINDOW_SIZE_S": str(WINDOW_MS // 1000),
        "EDGE_ALLOWED_LATENESS_S": str(LATENESS_S),
    }
    windows.update({k: v for k, v in env.items() if k in windows})
    processes.start("bridge", ["bridge"], run.env(**windows))
    started = [Worker(processes, run, f"w{i + 1}", env) for i in range(workers)]
    for worker in started:
        worker.wait_ready()
    wait_until(
        lambda: "MQTT connected" in processes.log("bridge"),
        timeout_s=60,
        what="the bridge to subscribe",
    )
    return started


def _send(publisher: Publisher, run: Run, device: str, body: Any) -> None:
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    publisher.publish(run.mqtt_topic(device), payload)


def _reference(
    readings: list[tuple[str, int, float]],
) -> dict[tuple[str, int], dict[str, Any]]:
    """Window summaries computed naively from the distinct readings."""
    by_window: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for device, time_ms, value in set(readings):
        by_window[(device, time_ms - time_ms % WINDOW_MS)].append((time_ms, value))
    reference = {}
    for key, points in by_window.items():
        values = [v for _, v in points]
        total = math.fsum(values)
        reference[key] = {
            "count": len(values), "sum": total, "min": min(values),
            "max": max(values), "mean": total / len(values),
            "last": max(points)[1],
        }  # fmt: skip
    return reference


def _summaries(
    records: list[Record], metric: str = "level"
) -> dict[tuple[str, int], dict[str, Any]]:
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for record in records:
        body = orjson.loads(record.value)
        if body["metric"] != metric:
            continue
        key = (body["device_id"], body["window_start_ms"])
        fields = {k: body[k] for k in ("count", "sum", "min", "max", "mean", "last")}
        previous = found.setdefault(key, fields)
        # A repeat after a crash must carry exactly the same numbers.
        assert previous == fields, f"two different summaries for {key}"
        assert body["window_end_ms"] == body["window_start_ms"] + WINDOW_MS
    return found


def _stream(
    devices: int, per_device: int, seed: int
) -> tuple[list[tuple[str, int, float]], list[tuple[str, int, float]]]:
    """Readings every 10 s; 5% sent twice and 5% swapped with their successor."""
    rng = random.Random(seed)
    readings: list[tuple[str, int, float]] = []
    sent: list[tuple[str, int, float]] = []
    per_dev: dict[str, list[tuple[str, int, float]]] = {}
    for d in range(devices):
        device = f"dev{d:02d}"
        series = [
            (device, T0 + i * 10_000, round(rng.uniform(0, 100), 3))
            for i in range(per_device)
        ]
        readings.extend(series)
        order = list(series)
        for i in range(len(order) - 1):
            if rng.random() < 0.05:  # 10 s out of order, within the 30 s lateness
                order[i], order[i + 1] = order[i + 1], order[i]
        with_dups = []
        for item in order:
            with_dups.append(item)
            if rng.random() < 0.05:
                with_dups.append(item)
        per_dev[device] = with_dups
    for i in range(max(len(v) for v in per_dev.values())):
        for device in sorted(per_dev):
            if i < len(per_dev[device]):
                sent.append(per_dev[device][i])
    return readings, sent


def test_worker_windows_are_exact_with_duplicates_and_shuffles(
    run: Run, processes: Processes
) -> None:
    """20 devices x 600 readings; 5% twice, 5% shuffled within the lateness."""
    readings, sent = _stream(devices=20, per_device=600, seed=11)
    reference = _reference(readings)
    [worker] = _start_pipeline(processes, run)
    publisher = Publisher()

    for device, time_ms, value in sent:
        _send(publisher, run, device, {"time": time_ms, "level": value})
    publisher.wait_acked(len(sent), timeout_s=120)
    records = consume(
        [run.topic("window-summaries")],
        until=lambda rs: len(_summaries(rs)) >= len(reference),
        timeout_s=180,
    )
    publisher.close()

    assert len(reference) == 20 * 100
    assert _summaries(records) == reference
    counters = worker.counters()
    assert counters["duplicates"] == len(sent) - len(readings)
    assert counters["readings"] == len(readings)
    assert counters["late"] == 0


def test_worker_dead_letters_late_reading_and_closes_quiet_device_after_idle_timeout(
    run: Run, processes: Processes
) -> None:
    """With EDGE_IDLE_CLOSE=all (replays), the idle timeout closes every window."""
    [worker] = _start_pipeline(processes, run, EDGE_IDLE_CLOSE="all")
    publisher = Publisher()
    times = [T0, T0 + 30_000, T0 + 70_000, T0 + 200_000]

    for i, time_ms in enumerate(times):
        _send(publisher, run, "quiet", {"time": time_ms, "level": float(i)})
    _send(publisher, run, "quiet", {"time": T0 + 10_000, "level": 9.0})  # 190 s late
    publisher.wait_acked(5)
    letters = consume([run.topic("dead-letters")], until=lambda rs: len(rs) >= 1)
    records = consume(
        [run.topic("window-summaries")], until=lambda rs: len(rs) >= 3, timeout_s=30
    )
    publisher.close()

    [letter] = [orjson.loads(r.value) for r in letters]
    assert letter["stage"] == "window" and letter["field"] == "level"
    assert letter["reason"] == (
        f'reading "level" at time_ms={T0 + 10_000} is late: its window already'
        f" closed (allowed lateness {LATENESS_S} s, EDGE_ALLOWED_LATENESS_S)"
    )
    summaries = sorted(
        (orjson.loads(r.value) for r in records), key=lambda s: s["window_start_ms"]
    )
    assert [
        (s["window_start_ms"] - T0, s["count"], s["closed_by"]) for s in summaries
    ] == [(0, 2, "watermark"), (60_000, 1, "watermark"), (180_000, 1, "idle")]
    assert worker.counters()["late"] == 1


def test_worker_keeps_the_window_of_a_paused_device_and_closes_it_once_over(
    run: Run, processes: Processes
) -> None:
    """A pause longer than the idle timeout (3 s) inside a window loses nothing.

    With the default EDGE_IDLE_CLOSE=clock the bridge's ticks close the window
    only once its end plus the lateness (2 s) has passed on the device's clock.
    """
    [worker] = _start_pipeline(processes, run, EDGE_ALLOWED_LATENESS_S="2")
    publisher = Publisher()

    _send(publisher, run, "paused", {"time": T0 + 50_000, "level": 1.0})
    publisher.wait_acked(1)
    wait_until(
        lambda: worker.counters()["readings"] == 1, timeout_s=30, what="first reading"
    )
    time.sleep(float(IDLE_TIMEOUT_S) + 2)  # a tick came and went: nothing closes
    _send(publisher, run, "paused", {"time": T0 + 55_000, "level": 2.0})
    publisher.wait_acked(2)
    records = consume(
        [run.topic("window-summaries")], until=lambda rs: len(rs) >= 1, timeout_s=60
    )
    publisher.close()

    [summary] = [orjson.loads(r.value) for r in records]
    assert (summary["window_start_ms"], summary["count"], summary["sum"]) == (
        T0,
        2,
        3.0,
    )
    assert summary["closed_by"] == "idle"
    counters = worker.counters()
    assert (counters["readings"], counters["late"], counters["dead_lettered"]) == (
        2,
        0,
        0,
    )


def test_worker_puts_one_instant_in_every_time_format_into_one_window(
    run: Run, processes: Processes
) -> None:
    _start_pipeline(processes, run)
    publisher = Publisher()
    instant_ms = T0 + 12_345
    rfc3339 = (
        datetime.fromtimestamp(instant_ms / 1000, tz=UTC)
        .isoformat()
        .replace("+00:00", "Z")
    )
    times: list[Any] = [
        instant_ms / 1000,
        instant_ms,
        instant_ms * 1000,
        instant_ms * 1_000_000,
        rfc3339,
    ]

    for i, when in enumerate(times):
        _send(publisher, run, "clock", {"time": when, "level": float(i + 1)})
    _send(publisher, run, "clock", {"time": T0 + 200_000, "level": 0.0})  # closes it
    publisher.wait_acked(6)
    records = consume([run.topic("window-summaries")], until=lambda rs: len(rs) >= 1)
    readings = consume([run.topic("readings")], until=lambda rs: len(rs) >= 6)
    publisher.close()

    first = orjson.loads(records[0].value)
    assert (first["window_start_ms"], first["count"], first["sum"]) == (T0, 5, 15.0)
    assert (
        sorted(orjson.loads(r.value)["time_ms"] for r in readings)[:5]
        == [instant_ms] * 5
    )


def test_worker_killed_mid_stream_keeps_windows_exact_and_cooldowns(
    run: Run, processes: Processes, tmp_path: Path
) -> None:
    """kill -9 of one of two workers, then a restart: nothing lost or counted twice."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nrules:\n  - id: overheat\n    match: {metric: hot}\n"
        "    when: {field: value, op: '>', threshold: 1000}\n"
        "    priority: 10\n    cooldown_s: 86400\n    action: cool_down\n"
    )
    readings, sent = _stream(devices=20, per_device=300, seed=5)
    reference = _reference(readings)
    w1, w2 = _start_pipeline(processes, run, workers=2, EDGE_RULES_FILE=str(rules))
    # Let the group settle (each worker owns partitions) before data flows.
    wait_until(
        lambda: _owns_partitions(w1) and _owns_partitions(w2),
        timeout_s=60,
        what="both workers to own partitions",
    )
    publisher = Publisher()
    hot = [(f"dev{d:02d}", T0 + 5_000, 5000.0) for d in range(20)]

    for device, time_ms, value in hot:  # fires once per device, then cools down
        _send(publisher, run, device, {"time": time_ms, "hot": value})
    half = len(sent) // 2
    for device, time_ms, value in sent[:half]:
        _send(publisher, run, device, {"time": time_ms, "level": value})
    wait_until(
        lambda: w1.counters()["readings"] + w2.counters()["readings"] > half // 3,
        timeout_s=60,
        what="both workers to make progress",
    )
    processes.kill9(w2.process)
    for device, time_ms, value in sent[half:]:
        _send(publisher, run, device, {"time": time_ms, "level": value})
    w2.restart()
    w2.wait_ready()
    for device, _, value in hot:  # within the cooldown: must be suppressed
        _send(publisher, run, device, {"time": T0 + 2_900_000, "hot": value})
    publisher.wait_acked(len(sent) + 2 * len(hot), timeout_s=120)
    records = consume(
        [run.topic("window-summaries")],
        until=lambda rs: len(_summaries(rs)) >= len(reference),
        timeout_s=240,
    )
    decisions = consume([run.topic("decisions")], until=lambda rs: False, timeout_s=5)
    publisher.close()

    assert _summaries(records) == reference
    fired = {
        (d["rule_id"], d["device_id"], d["time_ms"])
        for d in (orjson.loads(r.value) for r in decisions)
    }
    assert fired == {("overheat", device, T0 + 5_000) for device, _, _ in hot}


def test_worker_flags_spike_and_scores_like_score_csv(
    run: Run, processes: Processes, tmp_path: Path
) -> None:
    steady = tmp_path / "steady.csv"
    rows = ["timestamp,value"]
    for i in range(600):
        value = 60.0 if i == 450 else 20 + 0.5 * math.sin(i / 10) + 0.01 * (i % 7)
        stamp = datetime.fromtimestamp((T0 + i * 10_000) / 1000, tz=UTC)
        rows.append(f"{stamp:%Y-%m-%d %H:%M:%S},{value:.4f}")
    steady.write_text("\n".join(rows) + "\n")
    nab = PROJECT_ROOT / "data/nab/data/artificialWithAnomaly/art_daily_jumpsup.csv"
    _start_pipeline(
        processes,
        run,
        EDGE_ANOMALY_THRESHOLDS_BY_METRIC="level=0.000001,jumps=0.000001",
    )
    env = run.env()

    for path, device, metric in ((steady, "steady", "level"), (nab, "jumps", "jumps")):
        subprocess.run(
            [sys.executable, "-m", "streams", "replay", str(path),
             "--device-id", device, "--metric", metric, "--limit", "1500",
             "--no-progress"],
            cwd=PROJECT_ROOT, env=env, check=True, capture_output=True,
        )  # fmt: skip
    expected = {}
    for path, device in ((steady, "steady"), (nab, "jumps")):
        scored = list(score_csv(path, DetectorSpec()))[:1500]
        expected[device] = {
            int(datetime.fromisoformat(t).replace(tzinfo=UTC).timestamp() * 1000): s
            for t, _, s in scored
            if s >= 0.000001
        }
    total = sum(len(v) for v in expected.values())
    records = consume(
        [run.topic("anomalies")], until=lambda rs: len(rs) >= total, timeout_s=120
    )

    got: dict[str, dict[int, float]] = defaultdict(dict)
    for record in records:
        body = orjson.loads(record.value)
        got[body["device_id"]][body["time_ms"]] = body["anomaly_score"]
    assert got["steady"] == expected["steady"]
    assert got["jumps"] == expected["jumps"]
    spike_ms = T0 + 450 * 10_000
    flagged = sorted(t for t, s in got["steady"].items() if s >= DEFAULT_THRESHOLD)
    assert flagged and flagged[0] == spike_ms


def test_worker_rules_priority_and_cooldown_with_mqtt_commands(
    run: Run, processes: Processes, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    command_topic = f"t{run.id}/devices/{{device_id}}/commands"
    rules.write_text(f"""
version: 1
rules:
  - id: warm
    match: {{metric: temp}}
    when: {{field: value, op: '>', threshold: 50}}
    priority: 10
    cooldown_s: 0
    action: watch
  - id: hot
    match: {{metric: temp}}
    when: {{field: value, op: '>', threshold: 80}}
    priority: 90
    cooldown_s: 600
    action: cool_down
    command:
      topic: "{command_topic}"
      payload: {{cmd: cool_down, device: "{{device_id}}", value: "{{value}}"}}
""")
    [worker] = _start_pipeline(processes, run, EDGE_RULES_FILE=str(rules))
    commands: list[tuple[str, bytes]] = []
    listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    listener.on_message = lambda c, u, m: commands.append((m.topic, m.payload))
    listener.connect(MQTT_HOST, MQTT_PORT)
    listener.subscribe(f"t{run.id}/devices/+/commands", qos=1)
    listener.loop_start()
    time.sleep(0.5)
    publisher = Publisher()
    plan = [(0, 60.0), (10_000, 90.0), (20_000, 95.0), (700_000, 95.0), (710_000, 55.0)]

    for offset, value in plan:
        _send(publisher, run, "boiler", {"time": T0 + offset, "temp": value})
    publisher.wait_acked(len(plan))
    records = consume([run.topic("decisions")], until=lambda rs: len(rs) >= 4)
    wait_until(lambda: len(commands) >= 2, timeout_s=20, what="2 MQTT commands")
    listener.loop_stop()
    publisher.close()

    decisions = [orjson.loads(r.value) for r in records]
    assert [(d["rule_id"], d["time_ms"] - T0) for d in decisions] == [
        ("warm", 0),
        ("hot", 10_000),
        ("hot", 700_000),
        ("warm", 710_000),
    ]
    assert decisions[1]["priority"] == 90 and decisions[1]["action"] == "cool_down"
    assert worker.counters()["suppressed"] == 1
    assert [orjson.loads(p) for _, p in commands] == [
        {"cmd": "cool_down", "device": "boiler", "value": 90.0},
        {"cmd": "cool_down", "device": "boiler", "value": 95.0},
    ]
    assert {t for t, _ in commands} == {f"t{run.id}/devices/boiler/commands"}


def test_worker_refuses_to_start_with_an_invalid_rules_file(
    run: Run, tmp_path: Path
) -> None:
    rules = tmp_path / "bad.yaml"
    rules.write_text(
        "version: 1\nrules:\n  - id: x\n"
        "    when: {field: value, op: '=>', threshold: 1}\n    action: a\n"
    )

    result = subprocess.run(
        [sys.executable, "-m", "streams", "worker", "--rules-file", str(rules)],
        cwd=PROJECT_ROOT, env=run.env(EDGE_WEB_PORT=str(_free_port())),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert result.returncode != 0
    assert "bad.yaml:4" in result.stderr
    assert "rules[0].when.op" in result.stderr
    assert "the worker does not start" in result.stderr


def test_worker_dead_letters_bad_input_and_the_stream_goes_on(
    run: Run, processes: Processes
) -> None:
    [worker] = _start_pipeline(processes, run)
    publisher = Publisher()
    t_s = T0 / 1000
    bad = [
        b'{"time": 1, "level": ',
        b'{"time": %d, "level": NaN}' % t_s,
        b'{"time": %d, "level": Infinity}' % t_s,
        b'{"time": %d, "level": "21.5"}' % t_s,
        b'{"time": %d, "level": 18446744073709551617}' % t_s,
        b'{"time": 12, "level": 1.0}',
        b'{"time": %d, "level": 1.0, "level": 2.0}' % t_s,
        b'"just text"',
        b"\xff\xfe not utf-8",
    ]

    for payload in bad:
        _send(publisher, run, "noisy", payload)
    _send(publisher, run, "noisy", {"time": T0, "level": 7.5})
    _send(publisher, run, "noisy", {"level": 8.5})  # no time: receive time, marked
    publisher.wait_acked(len(bad) + 2)
    letters = consume([run.topic("dead-letters")], until=lambda rs: len(rs) >= len(bad))
    readings = consume([run.topic("readings")], until=lambda rs: len(rs) >= 2)
    publisher.close()

    reasons = [orjson.loads(r.value)["reason"] for r in letters]
    assert len(reasons) == len(bad)
    assert sum("must be JSON" in r for r in reasons) == 3  # truncated, NaN, Infinity
    assert 'field "level" must be a finite number, got str "21.5"' in reasons
    assert any(
        'field "level" must be a number of magnitude below 2^64' in r for r in reasons
    )
    assert any(
        r.startswith('field "time" must be at or after 2000-01-01') for r in reasons
    )
    assert 'field "level" must appear once, got it several times' in reasons
    assert any('got str "just text"' in r and 'field "payload"' in r for r in reasons)
    assert any("UTF-8" in r for r in reasons)
    values = [orjson.loads(r.value) for r in readings]
    assert [v["value"] for v in values] == [7.5, 8.5]
    assert values[1]["attributes"] == {"edge.time_source": "received"}
    assert worker.counters()["rejected"] == len(bad)


def test_windows_stay_exact_when_kafka_is_down_longer_than_the_idle_timeout(
    run: Run, processes: Processes
) -> None:
    """Kafka down 12 s (idle timeout 3 s) while devices keep sending: none late.

    The bridge holds what it receives while Kafka is down and sends it when Kafka
    is back. The devices never fall quiet, so no window may close by the idle
    timeout: nothing must come out late, every window must be exact.
    """
    devices, rounds = 4, 120  # a reading per device every 0.25 s for 30 s
    readings = [
        (f"dev{d}", T0 + i * 5_000, float(d * 1000 + i))
        for i in range(rounds)
        for d in range(devices)
    ]
    reference = _reference(readings)
    [worker] = _start_pipeline(processes, run)
    publisher = Publisher()
    stack = LocalStack(Settings(stack_dir=STACK_DIR), say=lambda line: None)

    def outage() -> None:
        stack.stop_server("kafka")
        time.sleep(12.0)
        stack.start_server("kafka")

    cut = threading.Thread(target=outage)
    started = time.monotonic()
    for i in range(rounds):
        if i == 20:
            cut.start()
        for device, time_ms, value in readings[i * devices : (i + 1) * devices]:
            _send(publisher, run, device, {"time": time_ms, "level": value})
        time.sleep(max(0.0, started + (i + 1) * 0.25 - time.monotonic()))
    cut.join(timeout=120)
    publisher.wait_acked(len(readings), timeout_s=120)

    def all_windows(records: list[Record]) -> bool:
        worker.ready()  # restarts the worker if it exited 75, as compose would
        return len(_summaries(records)) >= len(reference)

    records = consume([run.topic("window-summaries")], until=all_windows, timeout_s=180)
    letters = consume([run.topic("dead-letters")], until=lambda rs: False, timeout_s=3)
    publisher.close()

    assert not cut.is_alive()
    assert [orjson.loads(r.value)["reason"] for r in letters] == []
    assert _summaries(records) == reference
