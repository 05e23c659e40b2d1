"""The Faust application: topics, tables, the pipeline agent, web views.

One agent, ``process``, reads ``telemetry-raw`` keyed by ``device_id`` and does the
whole local path in one Kafka hop (raw -> readings, window summaries, anomalies,
decisions, MQTT commands), so a decision is produced within milliseconds of the
raw record. Its concurrency is 1: with more, faust-streaming may commit past a
message still in work.

State lives in one table backed by a changelog topic, ``devices``: one record per
device holding the windows and detector of each of its series, its rule
cooldowns and counters, and the offset of the last record applied, so every
change of a device's state is one atomic changelog record. Faust forbids table writes
outside a stream, so idle windows are closed through the stream too: the bridge
sends a *tick* (an empty record with the header ``edge_tick``) for each device
silent for the idle timeout, in the device's partition, after every record of
the device it received before; so neither a backlog in Kafka nor a Kafka outage
that held the bridge's records back makes a device look idle too early.
Subscribers of ``telemetry-raw`` skip records with that header.

The exporter runs beside the agent in the same process (see
:mod:`streams.export`); set ``EDGE_EXPORT_ENABLED=false`` to run it alone with
``edge-otlp export``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.web import Request, Response, View

from connectors.kafka_topics import PIPELINE_TOPICS
from connectors.mqtt import TICK_HEADER as BRIDGE_TICK_HEADER
from connectors.mqtt import CommandPublisher
from models.detectors import DEFAULT_THRESHOLD, DetectorSpec
from models.records import Decision
from models.rules import RuleSet, RuleSetError, load_rules
from models.windows import WindowSpec
from streams.config import PROJECT_RULES_DIR, ConfigError, Settings
from streams.pipeline import Outputs, Pipeline, PipelineConfig
from streams.tablestore import WriteBackStore

logger = logging.getLogger(__name__)

# Header of the idle ticks the bridge writes into telemetry-raw (value: send ms).
TICK_HEADER = BRIDGE_TICK_HEADER


class FlushingConsumer(faust_aiokafka.Consumer):
    """Faust's Kafka consumer, but offsets are committed only after a flush.

    Faust writes table changelogs with ``send_soon`` (buffered) and sends agent
    output without waiting, yet commits source offsets on a timer. Without a
    flush a crash could keep a committed offset whose state change or output
    never reached Kafka: the reading would be lost. Before each commit this
    waits for what was produced until then (not for what the agent adds
    meanwhile, which would starve the commit under load).
    """

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        # Faust marks offsets it never delivered as acknowledged, assuming they are
        # compaction holes or transaction markers. telemetry-raw has neither: a gap
        # is a delivery race around rebalances, and acknowledging it would commit
        # past unprocessed records; left unacknowledged, they are read again
        # after the next rebalance or restart.
        return None

    async def _commit_offsets(
        self, offsets: Mapping[TP, int], start_new_transaction: bool = True
    ) -> bool:
        state = getattr(self.app, "edge_state", None)
        if state is not None:
            state.flush_tables()
        await _flush_produced_so_far(self.app.producer)
        if state is not None:
            await state.flush_decisions()
        # Let the delivery callbacks of what was flushed run (one may exit).
        await asyncio.sleep(0)
        result: bool = await super()._commit_offsets(
            offsets, start_new_transaction=start_new_transaction
        )
        return result


async def _flush_produced_so_far(producer: Any) -> None:
    """Hand Faust's buffered messages to aiokafka, then wait for their delivery."""
    buffer = producer.buffer
    remaining = buffer.size
    while remaining > 0 and buffer.size > 0:
        # flush_atmost gives up after a 0.1 s pause and says how many it sent.
        remaining -= await buffer.flush_atmost(remaining)
    kafka = getattr(producer, "_producer", None)
    if kafka is not None:
        await _flush_now(kafka)


async def _flush_now(kafka: Any) -> None:
    """Wait for the batches an aiokafka producer holds now, not for later ones.

    The batches are closed and sent at once instead of after their linger
    (``EDGE_KAFKA_LINGER_MS``), so a commit waits one round trip, not a linger
    more. aiokafka does that for transactions (``flush_for_commit``); a version
    without it gets the plain flush, which waits out the linger.
    """
    accumulator = getattr(kafka, "_message_accumulator", None)
    flush_for_commit = getattr(accumulator, "flush_for_commit", None)
    if flush_for_commit is not None:
        await flush_for_commit()
    else:
        await kafka.flush()


class GapDetector:
    """Stop the worker when Faust hands the agent records out of offset order.

    Around rebalances faust-streaming can drop records it fetched under an
    older group generation and acknowledge them unprocessed (and it treats any
    offset gap as a compaction hole). telemetry-raw has no holes, so a record
    whose offset is past the next expected one of its partition means records
    were skipped. Processing it would move the device's applied offset past
    them for good; instead the worker exits at once, before committing, so a
    restarted or surviving worker reads the partition again from the last
    commit. Exit code 75 (temporary failure) tells a supervisor to restart it.
    """

    EXIT_CODE = 75  # EXIT_FOR_RESTART

    def __init__(self) -> None:
        self._next: dict[Any, int] = {}

    def reset(self) -> None:
        """Forget positions (call on every rebalance)."""
        self._next.clear()

    def check(self, tp: Any, offset: int) -> bool:
        """Return False for a record already processed; exit on a gap."""
        expected = self._next.get(tp)
        if expected is not None and offset < expected:
            return False
        if expected is not None and offset > expected:
            logger.error(
                "records skipped by the consumer topic=%s partition=%s"
                " offsets=%d..%d; exiting so they are read again",
                tp.topic,
                tp.partition,
                expected,
                offset - 1,
            )
            _exit_for_restart()
        self._next[tp] = offset + 1
        return True


EXIT_FOR_RESTART = 75  # temporary failure: a supervisor restarts the worker
# Faust's count-based commit cannot be switched off; this count is never reached
# (the timer commits every second).
COMMIT_EVERY_NEVER = 2**62


def _exit_for_restart() -> None:
    """Exit at once, before any further commit, so the records are read again."""
    logging.shutdown()
    os._exit(EXIT_FOR_RESTART)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def load_ruleset(settings: Settings) -> RuleSet:
    """Load the rules file of the settings (default: the bundled demo pack).

    Raises:
        ConfigError: listing every problem with its line and field.
    """
    path = settings.rules_file or PROJECT_RULES_DIR / "demo.yaml"
    try:
        ruleset = load_rules(path)
        logger.info("rules loaded file=%s rules=%d", path, len(ruleset.rules))
        return ruleset
    except RuleSetError as exc:
        problems = "\n".join(str(p) for p in exc.problems)
        raise ConfigError(
            f"EDGE_RULES_FILE={path} is invalid; the worker does not start:\n{problems}"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"EDGE_RULES_FILE={path} cannot be read: {exc}") from exc


def pipeline_config(settings: Settings) -> PipelineConfig:
    """Build the pipeline's configuration from the settings.

    Raises:
        ConfigError: naming the variable that is invalid.
    """
    try:
        window = WindowSpec(
            size_ms=round(settings.window_size_s * 1000),
            idle_timeout_ms=round(settings.idle_timeout_s * 1000),
            allowed_lateness_ms=round(settings.allowed_lateness_s * 1000),
            idle_close=settings.idle_close,
        )
        hopping = None
        if settings.hopping_window_size_s > 0:
            hopping = WindowSpec(
                size_ms=round(settings.hopping_window_size_s * 1000),
                step_ms=round(settings.hopping_window_step_s * 1000) or None,
                idle_timeout_ms=round(settings.idle_timeout_s * 1000),
                allowed_lateness_ms=round(settings.allowed_lateness_s * 1000),
                idle_close=settings.idle_close,
            )
    except ValueError as exc:
        raise ConfigError(f"EDGE_WINDOW_SIZE_S / EDGE_HOPPING_WINDOW_*: {exc}") from exc
    by_metric = {
        metric: DetectorSpec(name)
        for metric, name in settings.metric_map("detectors_by_metric").items()
    }
    try:
        thresholds = {
            metric: float(value)
            for metric, value in settings.metric_map(
                "anomaly_thresholds_by_metric"
            ).items()
        }
    except ValueError as exc:
        raise ConfigError(
            "EDGE_ANOMALY_THRESHOLDS_BY_METRIC must map metrics to numbers,"
            " e.g. temperature=0.7"
        ) from exc
    return PipelineConfig(
        window=window,
        hopping=hopping,
        detector=DetectorSpec(settings.detector),
        detector_by_metric=by_metric,
        threshold=settings.anomaly_threshold or DEFAULT_THRESHOLD,
        threshold_by_metric=thresholds,
        max_clock_skew_ms=round(settings.max_clock_skew_s * 1000),
        ruleset=load_ruleset(settings),
        max_series_per_device=settings.max_series_per_device,
    )


class DecisionProducer:
    """A Kafka producer of its own for decision records, with no linger.

    The worker's other outputs (readings, window summaries, anomalies, dead
    letters) wait up to ``EDGE_KAFKA_LINGER_MS`` in Faust's producer to go out
    in few requests, which saves the worker most of its system calls at high
    rates; a decision is the local response and goes out at once. Keyed like the
    other outputs, so a device's decisions land in its partition. Started on the
    first decision; the commit hook flushes it like Faust's producer.
    """

    def __init__(self, bootstrap: str) -> None:
        self._bootstrap = bootstrap
        self._producer: AIOKafkaProducer | None = None

    async def send(self, topic: str, key: bytes, value: bytes) -> asyncio.Future[Any]:
        """Send one record; return its delivery future (a KafkaError on failure)."""
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap, acks="all", linger_ms=0
            )
            await producer.start()
            self._producer = producer
        future: asyncio.Future[Any] = await self._producer.send(
            topic, value=value, key=key
        )
        return future

    async def flush(self) -> None:
        """Wait until every decision sent so far is acknowledged."""
        if self._producer is not None:
            await self._producer.flush()

    async def stop(self) -> None:
        """Flush and close the producer."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()


@dataclass
class WorkerState:
    """Runtime companions of the app: pipeline, publisher, exporter, deadlines."""

    pipeline: Pipeline
    commands: CommandPublisher
    decisions: DecisionProducer | None = None
    exporter: Any = None
    export_failed: bool = False
    stores: list[WriteBackStore] = field(default_factory=list)
    gaps: GapDetector = field(default_factory=lambda: GapDetector())
    # device_id -> wall time (ms) when its open windows may be idle.
    idle_deadlines: dict[str, int] = field(default_factory=dict)
    started_at_ms: int = field(default_factory=_now_ms)
    last_rate_at_ms: int = field(default_factory=_now_ms)
    last_rate_readings: int = 0
    readings_per_s: float = 0.0

    def flush_tables(self) -> None:
        """Write the buffered state changes to the tables' changelogs."""
        for store in self.stores:
            store.flush()

    async def flush_decisions(self) -> None:
        """Wait for the decision records sent so far."""
        if self.decisions is not None:
            await self.decisions.flush()

    def on_delivered(self, delivery: asyncio.Future[Any]) -> None:
        """Exit when Kafka refused an output for good (after its own retries).

        Its source record's offset must not be committed: the commit hook
        lets these callbacks run first, and a restart produces it again.
        """
        if delivery.cancelled():
            error: BaseException | None = asyncio.CancelledError()
        else:
            error = delivery.exception()
        if error is not None:
            logger.error(
                "an output was not delivered to Kafka (%r); exiting so its"
                " source record is processed again", error,
            )  # fmt: skip
            _exit_for_restart()


def create_app(settings: Settings) -> faust.App:
    """Build the worker's Faust app, its topics, tables, agent, timer and views.

    Raises:
        ConfigError: when the settings or the rules file are invalid.
    """
    config = pipeline_config(settings)
    app_id = f"{settings.topic_prefix}edge-otlp-worker"
    data_dir = settings.data_dir / (settings.worker_id or "default")
    data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        datadir=str(data_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        web_enabled=True,
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        web_in_thread=False,
        producer_acks=-1,
        producer_linger_ms=settings.kafka_linger_ms,
        processing_guarantee="at_least_once",
        # Commit on the 1 s timer only. Faust's count-based commit runs inside its
        # fetch loop, so every commit (which first waits for Kafka to acknowledge
        # what was produced) held up delivery: 15-30 ms stalls, p99 latency.
        broker_commit_every=COMMIT_EVERY_NEVER,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=4096,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.kafka_session_timeout_s / 5),
        key_serializer="raw",
        value_serializer="raw",
    )
    app.transport.Consumer = FlushingConsumer  # type: ignore[misc]
    raw_topic = app.topic(
        settings.topic("telemetry-raw"), key_serializer="raw", value_serializer="raw"
    )
    # Keys and values are the pipeline's own compact bytes: bytes types make Faust
    # use the raw codec for the changelogs (its default would be JSON).
    devices = app.Table(
        "devices", default=None, key_type=bytes, value_type=bytes,
        partitions=settings.partitions,
    )  # fmt: skip
    store = WriteBackStore(devices)
    decisions = DecisionProducer(settings.kafka_bootstrap)
    state = WorkerState(
        stores=[store],
        pipeline=Pipeline(config, clock_ms=_now_ms),
        commands=CommandPublisher(
            host=settings.mqtt_host,
            port=settings.mqtt_port_from_url,
            client_id=f"{settings.mqtt_client_id}-worker-{settings.worker_id or '0'}",
        ),
        decisions=decisions,
    )
    app.edge_state = state  # type: ignore[attr-defined]

    topic_names = {name: settings.topic(name) for name in PIPELINE_TOPICS}

    async def send(name: str, key: bytes, value: bytes) -> None:
        # Straight to the producer: Faust's Topic.send costs more than the step
        # itself. The commit hook waits for these like for Faust's own sends.
        delivery = await app.producer.send(
            topic_names[name], key, value, partition=None, timestamp=None,
            headers=None,
        )  # fmt: skip
        delivery.add_done_callback(state.on_delivered)  # type: ignore[attr-defined]

    async def send_decision(key: bytes, value: bytes) -> None:
        delivery = await decisions.send(topic_names["decisions"], key, value)
        delivery.add_done_callback(state.on_delivered)

    async def emit(device_id: str, key: bytes, out: Outputs) -> None:
        if settings.publish_readings:
            for reading in out.readings:
                await send("readings", key, reading.to_json())
        for summary in out.summaries:
            await send("window-summaries", key, summary.to_json())
        for anomaly in out.anomalies:
            await send("anomalies", key, anomaly.to_json())
        for decision in out.decisions:
            _send_command(state.commands, decision)
            await send_decision(key, decision.to_json())
        for letter in out.dead_letters:
            await send("dead-letters", key, letter.to_json())
        if out.next_idle_deadline_ms is None:
            state.idle_deadlines.pop(device_id, None)
        else:
            state.idle_deadlines[device_id] = out.next_idle_deadline_ms

    @app.agent(raw_topic, concurrency=1)
    async def process(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            message = event.message
            if not state.gaps.check(message.tp, message.offset):
                continue
            key = message.key or b""
            device_id = key.decode(errors="replace")
            try:
                out = _step(state.pipeline, store, message, device_id)
                await emit(device_id, key, out)
            except Exception:
                # The device's state may be half changed in memory, or an output
                # was not sent: stop before anything of it is committed; a
                # restart reads the record again.
                logger.exception(
                    "pipeline step failed topic=%s partition=%s offset=%s;"
                    " exiting so it is read again",
                    message.topic, message.partition, message.offset,
                )  # fmt: skip
                _exit_for_restart()

    @app.timer(interval=1.0)  # type: ignore[untyped-decorator]
    async def update_rate() -> None:
        _update_rate(state, _now_ms())

    @app.task  # type: ignore[untyped-decorator]
    async def start_companions() -> None:
        await asyncio.to_thread(state.commands.start)
        if settings.export_enabled:
            from streams.export import ExportService

            exporter = ExportService(settings)
            await exporter.start()
            state.exporter = exporter
            try:
                await exporter.wait()
            except Exception:
                # Nothing is exported any more; /health reports it not ready.
                logger.exception("export loop stopped; nothing more is exported")
                state.export_failed = True
                raise

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def write_state_before_handover(
        app: faust.App, *args: Any, **kwargs: Any
    ) -> None:
        # Faust has stopped the agent; before anyone else is assigned our
        # partitions, make every state change durable, so the next owner's
        # recovery reads it (a partition kept by this worker is read again from
        # its committed offset, which the applied offsets make harmless).
        state.flush_tables()
        await _flush_produced_so_far(app.producer)
        await state.flush_decisions()
        for store in state.stores:
            store.forget_objects()  # the next owner may change them
        state.idle_deadlines.clear()
        state.gaps.reset()

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def stop_companions(app: faust.App, *args: Any, **kwargs: Any) -> None:
        exporter, state.exporter = state.exporter, None
        if exporter is not None:
            await exporter.stop()  # a batch in flight stays uncommitted: re-sent
        await asyncio.to_thread(state.commands.stop)
        if state.decisions is not None:
            await state.decisions.stop()

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            # Partitions of telemetry-raw only (the changelog's are assigned too).
            source = raw_topic.get_topic_name()
            tps = app.consumer.assignment() if app.consumer else set()
            assigned = len([tp for tp in tps if tp.topic == source])
            kafka_ok = await _kafka_reachable(app)
            export_ok = not state.export_failed
            ready = kafka_ok and assigned > 0 and not app.rebalancing and export_ok
            body = {
                "live": True,
                "ready": ready,
                "kafka_reachable": kafka_ok,
                "export_alive": export_ok,
                "assigned_partitions": assigned,
                "rebalancing": bool(app.rebalancing),
            }
            return self.json(body, status=200 if ready else 503)

    @app.page("/counters")
    class Counters(View):
        async def get(self, request: Request) -> Response:
            return self.json(counters_view(state))

    return app


def counters_view(state: WorkerState) -> dict[str, Any]:
    """Return the JSON counters view of the worker."""
    counters: dict[str, Any] = dict(state.pipeline.counters.snapshot())
    counters["readings_per_s"] = round(state.readings_per_s, 1)
    counters["commands"] = state.commands.snapshot()
    counters["open_devices"] = len(state.idle_deadlines)
    if state.exporter is not None:
        counters["export"] = state.exporter.snapshot()
    return counters


def _update_rate(state: WorkerState, now_ms: int) -> None:
    elapsed_ms = now_ms - state.last_rate_at_ms
    if elapsed_ms < 1000:
        return
    readings = state.pipeline.counters.readings
    state.readings_per_s = (readings - state.last_rate_readings) * 1000 / elapsed_ms
    state.last_rate_readings = readings
    state.last_rate_at_ms = now_ms


def _step(
    pipeline: Pipeline, store: WriteBackStore, message: Any, device_id: str
) -> Outputs:
    """Run the pipeline on one ``telemetry-raw`` record or idle tick."""
    store.partition = message.partition
    tick_ms = _tick_ms(message.headers)
    if tick_ms is not None:
        return pipeline.close_idle(device_id=device_id, tick_ms=tick_ms, store=store)
    return pipeline.process_raw(
        device_id=device_id,
        payload=message.value or b"",
        received_ms=_received_ms(message.headers),
        source=f"kafka:{message.topic}",
        partition=message.partition,
        offset=message.offset,
        store=store,
    )


def _received_ms(headers: Any) -> int:
    for name, value in headers or ():
        if name == "received_at_ms":
            try:
                return int(value)
            except (TypeError, ValueError):
                break
    return _now_ms()


def _tick_ms(headers: Any) -> int | None:
    for name, value in headers or ():
        if name == TICK_HEADER:
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None


def _send_command(commands: CommandPublisher, decision: Decision) -> None:
    command = decision.command
    if command and command.get("topic"):
        payload = command.get("payload", "")
        if not isinstance(payload, str | bytes):
            import orjson

            payload = orjson.dumps(payload)
        commands.publish(command["topic"], payload)


async def _kafka_reachable(app: faust.App) -> bool:
    try:
        client = app.producer._producer.client  # type: ignore[attr-defined]
        return bool(await client.ready(client.get_random_node()))
    except (KafkaError, AttributeError, OSError, TypeError):
        return False
