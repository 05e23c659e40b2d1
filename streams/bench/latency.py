"""``bench latency``: MQTT publish to the local action, at a steady reading rate.

The bridge and the worker run as child processes with this run's names and a
rules file holding one rule that fires on every reading of the metric
``benchlat`` (``value >= 0``, no cooldown), with an MQTT command carrying the
reading's value. A publisher sends one reading per message at ``rate_per_s``
(QoS 1, 10 devices), each carrying a sequence number as its value. Two latencies
per reading, both against its send time on the same clock:

* **command**: publish to the decision's MQTT command arriving at a subscriber
  in this process (QoS 1): the local response path, raw -> decision -> action;
* **decision record**: publish to the decision arriving on the ``decisions``
  topic, read by a consumer in this process: one Kafka hop more.

The target phase publishes ``rate_per_s`` readings/s of which 1 in
``decide_every`` is of the deciding metric; the others (metric ``benchload``) go
through normalize, windows, detector and rules like any reading, so the load is
the full reading rate while decisions stay as rare as rules with cooldowns make
them at a site. A last phase at the same rate where every reading decides shows
the worst case.

Baseline, earlier in the same run and at the same rate: MQTT publish to a bare
paho subscriber's receive, on topics outside the bridge's pattern so that the
pipeline stays idle meanwhile.

A warm-up of 100 readings goes through the pipeline before the measured phase
and is left out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from typing import Any, NamedTuple

import orjson
import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer
from paho.mqtt.enums import CallbackAPIVersion

from streams.bench import BenchFigure
from streams.bench.live import (
    BenchRun,
    cleanup_topics,
    free_port,
    get_json,
    percentile,
    start_process,
    stop_process,
    wait_for,
)

logger = logging.getLogger(__name__)

BENCH = "latency"
METRIC = "benchlat"
LOAD_METRIC = "benchload"
N_DEVICES = 10
WARM_UP = 100
WARM_UP_ID = 10_000_000  # warm-up values start here, far above any measured id
START_TIMEOUT_S = 90.0  # worker start-up with group join takes 10-30 s here
DRAIN_TIMEOUT_S = 60.0
PHASE_IDS = 1_000_000  # ids of phase k start at k * PHASE_IDS

RULES_YAML = """\
version: 1
rules:
  - id: bench-every-reading
    description: fires on every reading of the latency bench
    match: {{metric: {metric}}}
    when: {{field: value, op: ">=", threshold: 0}}
    cooldown_s: 0
    action: bench_record
    command:
      topic: "{command_root}/{{device_id}}/cmd"
      payload: {{seq: "{{value}}"}}
"""


def _observed(value: Any) -> float | None:
    """Find the first ``observed`` number in a decision's evidence."""
    if isinstance(value, dict):
        if isinstance(value.get("observed"), int | float):
            return float(value["observed"])
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            found = _observed(item)
            if found is not None:
                return found
    return None


class _DecisionReader(threading.Thread):
    """Read ``decisions`` in a thread of its own; note each one's arrival time."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(name="bench-decisions", daemon=True)
        self._kafka_bootstrap = bootstrap
        self._topic = topic
        self.arrived_ns: dict[int, int] = {}
        self.decided_at_ms: dict[int, int] = {}
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._consume())
        except BaseException as exc:  # noqa: BLE001 - reported by the bench
            self.error = exc
            self.ready.set()

    async def _consume(self) -> None:
        consumer = AIOKafkaConsumer(
            self._topic,
            bootstrap_servers=self._kafka_bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
        )
        await consumer.start()
        try:
            while not self.stopping.is_set():
                batch = await consumer.getmany(timeout_ms=100)
                self.ready.set()
                now_ns = time.time_ns()
                for messages in batch.values():
                    for message in messages:
                        decision = orjson.loads(message.value or b"{}")
                        seq = _observed(decision.get("evidence"))
                        if seq is not None:
                            self.arrived_ns[int(seq)] = now_ns
                            decided = int(decision.get("decided_at_ms", 0))
                            self.decided_at_ms[int(seq)] = decided
        finally:
            await consumer.stop()


class _CommandListener:
    """Subscribe to the bench rule's MQTT commands; note each one's arrival."""

    def __init__(self, run: BenchRun, root: str) -> None:
        self.arrived_ns: dict[int, int] = {}
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=run.client_id("commands"),
            protocol=mqtt.MQTTv311,
        )
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.connect(run.settings.mqtt_host, run.settings.mqtt_port_from_url)
        self._client.loop_start()
        self._client.subscribe(f"{root}/+/cmd", qos=1)
        if not self._subscribed.wait(10.0):
            raise TimeoutError("the command subscription was not acknowledged")

    def _on_message(
        self, client: Any, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        now_ns = time.time_ns()
        try:
            seq = int(float(orjson.loads(message.payload)["seq"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return
        self.arrived_ns.setdefault(seq, now_ns)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _publisher(run: BenchRun, role: str) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=run.client_id(role),
        protocol=mqtt.MQTTv311,
    )
    client.max_inflight_messages_set(1000)
    client.connect(run.settings.mqtt_host, run.settings.mqtt_port_from_url)
    client.loop_start()
    return client


def _publish_paced(
    client: mqtt.Client,
    topics: list[str],
    ids: range,
    rate_per_s: float,
    decide_every: int = 1,
) -> dict[int, int]:
    """Publish one reading per id at ``rate_per_s``.

    Every ``decide_every``-th reading is of the metric the bench rule decides
    on; the others (metric ``LOAD_METRIC``) go through the same pipeline, are
    windowed and scored, but decide nothing.

    Returns:
        The send time of each deciding reading's id.
    """
    sent_ns: dict[int, int] = {}
    started = time.perf_counter()
    for i, seq in enumerate(ids):
        delay_s = started + i / rate_per_s - time.perf_counter()
        if delay_s > 0:
            time.sleep(delay_s)
        now_ns = time.time_ns()
        deciding = seq % decide_every == 0
        metric = METRIC if deciding else LOAD_METRIC
        payload = orjson.dumps({"time": now_ns // 1_000_000, metric: seq})
        if deciding:
            sent_ns[seq] = now_ns
        client.publish(topics[i % len(topics)], payload, qos=1)
    return sent_ns


def _bare_latencies_ms(run: BenchRun, n: int, rate_per_s: float) -> list[float]:
    """Publish to a bare subscriber at the same rate; return the latencies."""
    root = f"bench/{run.label}-{run.id}-bare"
    arrived_ns: dict[int, int] = {}
    subscribed = threading.Event()
    subscriber = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=run.client_id("bare"),
        protocol=mqtt.MQTTv311,
    )

    def on_message(client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        arrived_ns[int(orjson.loads(message.payload)[METRIC])] = time.time_ns()

    subscriber.on_message = on_message
    subscriber.on_subscribe = lambda *args: subscribed.set()
    subscriber.connect(run.settings.mqtt_host, run.settings.mqtt_port_from_url)
    subscriber.loop_start()
    subscriber.subscribe(f"{root}/+/telemetry", qos=1)
    subscribed.wait(10.0)
    publisher = _publisher(run, "bare-publisher")
    try:
        topics = [f"{root}/dev{d}/telemetry" for d in range(N_DEVICES)]
        sent_ns = _publish_paced(publisher, topics, range(n), rate_per_s)
        wait_for(lambda: len(arrived_ns) >= n, timeout_s=DRAIN_TIMEOUT_S, what="bare")
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        subscriber.disconnect()
        subscriber.loop_stop()
    return [(arrived_ns[s] - sent_ns[s]) / 1e6 for s in sent_ns if s in arrived_ns]


class _Phase(NamedTuple):
    """Latencies (ms) of one phase, of the readings whose answer came back."""

    command: list[float]
    record: list[float]
    decided: list[float]


class PhaseSpec(NamedTuple):
    """One measured phase: readings per second, how many, 1 in how many decides."""

    rate_per_s: float
    readings: int
    decide_every: int


def _pipeline_latencies_ms(run: BenchRun, phases: list[PhaseSpec]) -> list[_Phase]:
    """Publish through bridge and worker, one phase after the other.

    Returns:
        Per phase, publish -> command received, publish -> decision record
        received and publish -> ``decided_at_ms``.
    """
    command_root = f"bench/{run.label}-{run.id}-commands"
    rules = run.log_dir / "rules.yaml"
    rules.write_text(
        RULES_YAML.format(metric=METRIC, command_root=command_root), encoding="utf-8"
    )
    commands = _CommandListener(run, command_root)
    port = free_port()
    env = run.env(
        EDGE_WEB_PORT=str(port), EDGE_WORKER_ID=run.id, EDGE_RULES_FILE=str(rules)
    )
    worker = start_process(run, "worker", ["worker"], env)
    bridge = start_process(run, "bridge", ["bridge"], env)
    reader = _DecisionReader(run.settings.kafka_bootstrap, run.topic("decisions"))
    publisher: mqtt.Client | None = None
    sent: list[dict[int, int]] = []
    try:
        health = f"http://127.0.0.1:{port}/health"
        wait_for(
            lambda: bool((get_json(health) or {}).get("ready")),
            timeout_s=START_TIMEOUT_S,
            what="worker ready",
            every_s=0.5,
        )
        reader.start()
        reader.ready.wait(30.0)
        if reader.error is not None:
            raise reader.error
        publisher = _publisher(run, "publisher")
        topics = [run.mqtt_topic(f"dev{d}") for d in range(N_DEVICES)]

        # Warm-up: repeat until the pipeline answers (the bridge may still be
        # connecting), then let it settle.
        warm_ids = range(WARM_UP_ID, WARM_UP_ID + WARM_UP)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not reader.arrived_ns and time.monotonic() < deadline:
            _publish_paced(publisher, topics, warm_ids, 100.0)
            time.sleep(1.0)
        if not reader.arrived_ns:
            raise TimeoutError(f"no decision came back; logs in {run.log_dir}")
        time.sleep(2.0)

        for number, phase in enumerate(phases):
            ids = range(number * PHASE_IDS, number * PHASE_IDS + phase.readings)
            sent_ns = _publish_paced(
                publisher, topics, ids, phase.rate_per_s, phase.decide_every
            )
            sent.append(sent_ns)
            # A pipeline slower than the rate builds a backlog: wait for it to
            # drain, within a bound, and count what never came back.
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while time.monotonic() < deadline:
                if all(
                    seq in reader.arrived_ns and seq in commands.arrived_ns
                    for seq in sent_ns
                ):
                    break
                time.sleep(0.2)
            time.sleep(1.0)
    finally:
        reader.stopping.set()
        commands.stop()
        if publisher is not None:
            publisher.disconnect()
            publisher.loop_stop()
        stop_process(bridge)
        stop_process(worker)
        if reader.is_alive():
            reader.join(10.0)
    results = []
    for sent_ns in sent:
        arrived = [s for s in sent_ns if s in reader.arrived_ns]
        results.append(
            _Phase(
                command=[
                    (commands.arrived_ns[s] - sent_ns[s]) / 1e6
                    for s in sent_ns
                    if s in commands.arrived_ns
                ],
                record=[(reader.arrived_ns[s] - sent_ns[s]) / 1e6 for s in arrived],
                decided=[reader.decided_at_ms[s] - sent_ns[s] / 1e6 for s in arrived],
            )
        )
    return results


def run(
    rate_per_s: float = 1_000.0,
    duration_s: float = 10.0,
    low_rate_per_s: float = 100.0,
    decide_every: int = 10,
    **_: Any,
) -> list[BenchFigure]:
    """Measure publish -> decision latency against publish -> bare subscriber.

    Three phases, one after the other:

    1. ``low_rate_per_s`` readings/s, every reading decides: latency without load;
    2. ``rate_per_s`` readings/s, 1 in ``decide_every`` decides (the target);
    3. ``rate_per_s`` readings/s, every reading decides: the stress case.

    Args:
        rate_per_s: readings published per second (one per MQTT message).
        duration_s: length of each measured phase.
        low_rate_per_s: rate of the first phase.
        decide_every: 1 in how many readings of the target phase the rule fires.

    Returns:
        p50 and p99 per phase and path against the bare MQTT baseline at
        ``rate_per_s``; the notes say how many came back.
    """
    bench_run = BenchRun(BENCH)
    n = round(rate_per_s * duration_s)
    specs = [
        PhaseSpec(low_rate_per_s, round(low_rate_per_s * duration_s), 1),
        PhaseSpec(rate_per_s, n, decide_every),
        PhaseSpec(rate_per_s, n, 1),
    ]
    try:
        bare = _bare_latencies_ms(bench_run, n, rate_per_s)
        phases = _pipeline_latencies_ms(bench_run, specs)
    finally:
        cleanup_topics(bench_run)

    bare_name = f"MQTT publish to bare subscriber, {rate_per_s:,.0f}/s"
    figures = []
    for number, (spec, phase) in enumerate(zip(specs, phases, strict=True)):
        is_target = number == 1
        decisions = math.ceil(spec.readings / spec.decide_every)
        what = (
            f"{spec.rate_per_s:,.0f}/s"
            if spec.decide_every == 1
            else f"{spec.rate_per_s:,.0f}/s, 1 in {spec.decide_every} decides"
        )
        if spec.decide_every == 1 and spec.rate_per_s == rate_per_s:
            what += ", every reading decides"
        paths = [("command", phase.command)]
        if is_target:
            paths.append(("decision record", phase.record))
        for path, values in paths:
            for label, fraction, target_ms in (("p50", 0.5, 5.0), ("p99", 0.99, 10.0)):
                value = percentile(values, fraction) if values else math.nan
                base = percentile(bare, fraction)
                note = (
                    f"{len(values):,} of {decisions:,} came back within"
                    f" {DRAIN_TIMEOUT_S:g} s of the phase's end"
                )
                if path == "command" and phase.decided:
                    split = percentile(phase.decided, fraction)
                    note += (
                        f"; {label} publish to the worker's decided_at_ms:"
                        f" {split:.1f} ms (ms resolution)"
                    )
                figures.append(
                    BenchFigure(
                        bench=BENCH,
                        name=f"publish to {path} {label}, {what}",
                        value=value,
                        unit="ms",
                        baseline=base,
                        baseline_name=bare_name,
                        ratio=value / base if base > 0 else None,
                        target=f"< {target_ms:g} ms" if is_target else None,
                        met=value < target_ms if is_target else None,
                        note=note,
                    )
                )
    return figures
