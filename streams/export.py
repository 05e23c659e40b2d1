"""The export service: Kafka topics -> OTLP/HTTP (or OTLP/JSON files), at least once.

It consumes ``window-summaries``, ``anomalies`` and ``decisions`` in the consumer
group ``edge-otlp-exporter`` with auto-commit off, gathers a batch bounded by item
count and age, encodes it and exports it; only when the receiver answered 2xx (or
the file line is on disk) are the batch's offsets committed. While the receiver
is unreachable the export call keeps retrying, so no further records are fetched:
consumption pauses, memory stays bounded by one batch, and the backlog waits in
Kafka.

Records that cannot be decoded, and batches a receiver refused for good (HTTP 400
and similar), go to ``dead-letters`` with the reason before their offsets are
committed, so nothing is dropped silently. It is plain asyncio: ``start()`` spawns
one task, ``stop()`` cancels it; the worker runs it in its own loop and
``edge-otlp export`` runs it alone.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    TopicAlreadyExistsError,
)
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from connectors.otlp.encode import ResourceInfo, encode_logs, encode_metrics
from connectors.otlp.exporter import (
    ExportCounters,
    Exporter,
    ExporterConfig,
    ExportError,
    ExportResult,
)
from connectors.otlp.files import FileSink
from models.records import AnomalyScore, DeadLetter, Decision, WindowSummary
from streams.config import PipelineError, Settings

logger = logging.getLogger(__name__)

GROUP_ID = "edge-otlp-exporter"
SOURCE_TOPICS = ("window-summaries", "anomalies", "decisions")
# A dead letter keeps the original bytes up to this size (base64 grows it by 4/3).
DEAD_LETTER_MAX_PAYLOAD_BYTES = 64 * 1024
# After a retriable failure that ran out of attempts, wait before the next round.
RETRY_ROUND_PAUSE_S = 1.0
# How often the export lag in the counters is asked of Kafka.
LAG_REFRESH_S = 5.0

Record = WindowSummary | AnomalyScore | Decision


class ExportFailed(PipelineError):
    """An export error translated at the service boundary (see ``retriable``)."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class Sink(Protocol):
    """What the service exports through: the HTTP exporter or the file sink."""

    async def start(self) -> None: ...  # noqa: D102

    async def stop(self) -> None: ...  # noqa: D102

    async def export_metrics(  # noqa: D102
        self, request: ExportMetricsServiceRequest
    ) -> ExportResult: ...

    async def export_logs(  # noqa: D102
        self, request: ExportLogsServiceRequest
    ) -> ExportResult: ...


@dataclass(slots=True)
class _Batch:
    summaries: list[WindowSummary] = field(default_factory=list)
    logs: list[AnomalyScore | Decision] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    # Next offset to commit per partition: last offset seen + 1.
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    held: int = 0

    def __len__(self) -> int:
        return self.held


@dataclass(slots=True)
class ExportServiceCounters:
    """What the service did; read with :meth:`ExportService.snapshot`."""

    batches: int = 0
    records: int = 0
    dead_letters: int = 0
    commits: int = 0
    max_records_held: int = 0
    lag_by_topic: dict[str, int] = field(default_factory=dict)


def exporter_config(settings: Settings, **overrides: Any) -> ExporterConfig:
    """Build the HTTP exporter's config from the settings.

    Args:
        settings: needs ``otlp_endpoint`` set.
        overrides: other :class:`ExporterConfig` fields (retry caps, limits).

    Returns:
        The config; its headers hold the secret ``EDGE_OTLP_HEADERS``.
    """
    if settings.otlp_endpoint is None:
        raise ValueError("exporter_config needs EDGE_OTLP_ENDPOINT to be set")
    return ExporterConfig(
        endpoint=settings.otlp_endpoint,
        compression=settings.otlp_compression,
        headers=settings.otlp_header_map(),
        ca_file=settings.otlp_ca_file,
        timeout_s=settings.otlp_timeout_s,
        **overrides,
    )


class ExportService:
    """Consume the pipeline's output topics and export them, committing after 2xx.

    Not safe to start twice. ``stop()`` cancels a batch in flight: its offsets
    are not committed, so it is exported again by the next run (at least once).
    Known limit: one batch is exported at a time, so throughput is bounded by
    the receiver's round trip; raise ``EDGE_EXPORT_MAX_BATCH_POINTS`` on a link
    with high latency.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        sink: Sink | None = None,
        group_id: str | None = None,
        instance_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Prepare the service; nothing connects before :meth:`start`.

        Args:
            settings: topics, Kafka, batching and OTLP settings.
            sink: where batches go; by default the HTTP exporter when
                ``EDGE_OTLP_ENDPOINT`` is set, else the OTLP/JSON file sink.
            group_id: consumer group; default ``<topic prefix>edge-otlp-exporter``.
            instance_id: ``service.instance.id`` of the resources; default the
                host name plus ``EDGE_WORKER_ID``.
            clock: monotonic seconds, for batch age.
        """
        self.settings = settings
        self.counters = ExportServiceCounters()
        self.group_id = group_id or f"{settings.topic_prefix}{GROUP_ID}"
        self.topics = {settings.topic(name): name for name in SOURCE_TOPICS}
        self.dead_letter_topic = settings.topic("dead-letters")
        self.sink: Sink = sink or _default_sink(settings)
        host = socket.gethostname()
        self.resource_info = ResourceInfo(
            service_instance_id=instance_id
            or f"{host}-{settings.worker_id or 'export'}",
            site=settings.site,
        )
        self._clock = clock
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
        # Next offset to export per partition, as last committed by this service.
        self._committed: dict[TopicPartition, int] = {}
        self.exported = asyncio.Event()

    async def start(self) -> None:
        """Create missing topics, connect, and start the export loop task."""
        s = self.settings
        await _ensure_topics(
            s.kafka_bootstrap,
            [*self.topics, self.dead_letter_topic],
            partitions=s.partitions,
        )
        await self.sink.start()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap, acks="all"
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            *self.topics,
            bootstrap_servers=s.kafka_bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name="edge-otlp-export")
        self._lag_task = asyncio.create_task(self._watch_lag(), name="export-lag")
        logger.info(
            "export service started topics=%s group_id=%s max_batch_points=%d"
            " max_batch_age_s=%.2f sink=%s",
            ",".join(self.topics),
            self.group_id,
            s.export_max_batch_points,
            s.export_max_batch_age_s,
            type(self.sink).__name__,
        )

    async def stop(self) -> None:
        """Cancel the loop (a batch in flight stays uncommitted), then disconnect."""
        lag_task, self._lag_task = self._lag_task, None
        if lag_task is not None:
            lag_task.cancel()
            await asyncio.gather(lag_task, return_exceptions=True)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                # The loop had died; stopping still has to release the clients.
                logger.exception("export loop had failed before stop")
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        await self.sink.stop()

    async def __aenter__(self) -> ExportService:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait(self) -> None:
        """Wait until the loop ends (only on an error; it runs until stopped)."""
        if self._task is not None:
            await self._task

    def snapshot(self) -> dict[str, object]:
        """Return the counters as a dict: records, dead letters, lag, sink's."""
        c = self.counters
        sink_counters = getattr(self.sink, "counters", None)
        sink_view: dict[str, object] = {}
        if isinstance(sink_counters, ExportCounters):
            sink_view = sink_counters.snapshot()
        elif isinstance(sink_counters, dict):
            sink_view = dict(sink_counters)
        return {
            "batches": c.batches,
            "records": c.records,
            "dead_letters": c.dead_letters,
            "commits": c.commits,
            "max_records_held": c.max_records_held,
            "lag_by_topic": dict(c.lag_by_topic),
            "sink": sink_view,
        }

    async def refresh_lag(self) -> None:
        """Set ``lag_by_topic``: records on the topics not exported yet, per topic.

        Asks Kafka for the end of each assigned partition, so the figure grows
        while the cloud is unreachable and consumption pauses. Raises
        :class:`KafkaError` when Kafka does not answer.
        """
        consumer = self._consumer
        if consumer is None:
            return
        assigned = list(consumer.assignment())
        if not assigned:
            return
        ends = await consumer.end_offsets(assigned)
        lag = dict.fromkeys(self.topics, 0)
        for tp, end in ends.items():
            done = self._committed.get(tp)
            if done is None:
                done = await consumer.committed(tp) or 0
                self._committed[tp] = done
            lag[tp.topic] += max(0, end - done)
        self.counters.lag_by_topic.update(lag)

    async def _watch_lag(self) -> None:
        while True:
            await asyncio.sleep(LAG_REFRESH_S)
            try:
                await self.refresh_lag()
            except KafkaError as exc:
                logger.debug("export lag not refreshed: %r", exc)

    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            if batch.held == 0 and not batch.offsets:
                continue
            await self._deliver(batch)

    async def _gather(self) -> _Batch:
        """Fetch records until the batch is full or its oldest record is too old."""
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError("ExportService.start() must be awaited first")
        s = self.settings
        batch = _Batch()
        first_at: float | None = None
        while batch.held < s.export_max_batch_points:
            if first_at is None:
                wait_s = s.export_max_batch_age_s
            else:
                wait_s = s.export_max_batch_age_s - (self._clock() - first_at)
                if wait_s <= 0:
                    break
            # max_records keeps what is held at or under the batch bound.
            fetched = await consumer.getmany(
                timeout_ms=max(1, int(wait_s * 1000)),
                max_records=s.export_max_batch_points - batch.held,
            )
            if not fetched and first_at is None:
                return batch
            for tp, messages in fetched.items():
                for message in messages:
                    self._add(batch, tp, message)
            if first_at is None and batch.offsets:
                first_at = self._clock()
            self.counters.max_records_held = max(
                self.counters.max_records_held, batch.held
            )
        return batch

    def _add(self, batch: _Batch, tp: TopicPartition, message: ConsumerRecord) -> None:
        batch.offsets[tp] = message.offset + 1
        batch.held += 1
        kind = self.topics[tp.topic]
        try:
            record = _decode(kind, message.value)
        except (ValueError, TypeError) as exc:
            where = f"{tp.topic}[{tp.partition}]@{message.offset}"
            logger.warning(
                "undecodable record dead-lettered topic=%s partition=%d offset=%d",
                tp.topic,
                tp.partition,
                message.offset,
            )
            batch.dead.append(_dead_letter(message, f"{kind} record: {exc}", where))
            return
        if isinstance(record, WindowSummary):
            batch.summaries.append(record)
        else:
            batch.logs.append(record)

    async def _deliver(self, batch: _Batch) -> None:
        started = self._clock()
        while True:
            try:
                await self._export(batch)
                break
            except ExportFailed as exc:
                if exc.retriable:
                    logger.error(
                        "export gave up for now, offsets not committed;"
                        " retrying the batch batch_size=%d error=%s",
                        batch.held,
                        exc,
                    )
                    await asyncio.sleep(RETRY_ROUND_PAUSE_S)
                    continue
                logger.error(
                    "receiver refused a batch for good; its records go to"
                    " dead-letters topic=%s batch_size=%d error=%s",
                    self.dead_letter_topic,
                    batch.held,
                    exc,
                )
                batch.dead.extend(_refused(batch, str(exc)))
                break
        await self._send_dead_letters(batch.dead)
        await self._commit(batch)
        self.counters.batches += 1
        self.counters.records += batch.held
        self.exported.set()
        logger.debug(
            "batch exported batch_size=%d elapsed_ms=%.1f",
            batch.held,
            (self._clock() - started) * 1000,
        )

    async def _export(self, batch: _Batch) -> None:
        info = self.resource_info
        try:
            if batch.summaries:
                metrics = encode_metrics(batch.summaries, resource_info=info)
                await self.sink.export_metrics(metrics)
            if batch.logs:
                logs = encode_logs(batch.logs, resource_info=info)
                await self.sink.export_logs(logs)
        except ExportError as exc:
            raise ExportFailed(str(exc), retriable=exc.retriable) from exc

    async def _send_dead_letters(self, letters: list[DeadLetter]) -> None:
        if not letters or self._producer is None:
            return
        sends = [
            await self._producer.send(
                self.dead_letter_topic,
                value=letter.to_json(),
                key=(letter.device_id or "").encode() or None,
            )
            for letter in letters
        ]
        await asyncio.gather(*sends)
        self.counters.dead_letters += len(letters)

    async def _commit(self, batch: _Batch) -> None:
        consumer = self._consumer
        if consumer is None or not batch.offsets:
            return
        try:
            await consumer.commit(dict(batch.offsets))
        except (CommitFailedError, IllegalStateError) as exc:
            # A rebalance took partitions away mid-batch: their new owner starts
            # from the last commit and exports this batch again (at least once).
            logger.warning(
                "offsets not committed after a rebalance; the batch will be"
                " exported again batch_size=%d error=%s",
                batch.held,
                type(exc).__name__,
            )
            return
        self.counters.commits += 1
        self._committed.update(batch.offsets)


def _default_sink(settings: Settings) -> Sink:
    if settings.otlp_endpoint is None:
        return FileSink(settings.otlp_output_dir)
    return Exporter(exporter_config(settings))


def _decode(kind: str, raw: bytes | None) -> Record:
    if raw is None:
        raise ValueError("value is empty (tombstone)")
    record: Record
    times: tuple[int, ...]
    if kind == "window-summaries":
        record = WindowSummary.from_json(raw)
        times = (record.window_start_ms, record.window_end_ms)
    elif kind == "anomalies":
        record = AnomalyScore.from_json(raw)
        times = (record.time_ms,)
    else:
        record = Decision.from_json(raw)
        times = (record.time_ms, record.decided_at_ms)
    if any(not isinstance(t, int) or t < 0 for t in times):
        raise ValueError("times must be epoch milliseconds as integers >= 0")
    return record


def _dead_letter(message: ConsumerRecord, reason: str, where: str) -> DeadLetter:
    raw = message.value or b""
    cut = raw[:DEAD_LETTER_MAX_PAYLOAD_BYTES]
    return DeadLetter(
        stage="export",
        reason=reason[:500],
        source=where,
        device_id=message.key.decode(errors="replace") if message.key else None,
        partition=message.partition,
        offset=message.offset,
        received_at_ms=int(time.time() * 1000),
        payload_b64=base64.b64encode(cut).decode(),
        truncated=len(cut) < len(raw),
    )


def _refused(batch: _Batch, reason: str) -> list[DeadLetter]:
    records: list[Record] = [*batch.summaries, *batch.logs]
    return [
        DeadLetter(
            stage="export",
            reason=f"OTLP receiver refused the batch: {reason}"[:500],
            source="otlp",
            device_id=record.device_id,
            received_at_ms=int(time.time() * 1000),
            payload_b64=base64.b64encode(record.to_json()).decode(),
        )
        for record in records
    ]


async def _ensure_topics(bootstrap: str, names: list[str], *, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [NewTopic(n, partitions, 1) for n in names if n not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another process created them first
    finally:
        await admin.close()


async def run_export_service(settings: Settings, **options: Any) -> None:
    """Run the export service until cancelled (the ``edge-otlp export`` command).

    Args:
        settings: the effective settings.
        options: :class:`ExporterConfig` overrides (e.g.
            ``unreachable_max_backoff_s``), used when an endpoint is set.
    """
    sink: Sink | None = None
    if settings.otlp_endpoint is not None:
        sink = Exporter(exporter_config(settings, **options))
    service = ExportService(settings, sink=sink)

    async def log_summaries() -> None:
        while True:
            await asyncio.sleep(settings.log_summary_interval_s)
            logger.info("export counters %s", service.snapshot())

    await service.start()
    summaries = asyncio.create_task(log_summaries())
    try:
        # Returns only when the export loop died; its error propagates.
        await service.wait()
    finally:
        summaries.cancel()
        await service.stop()


__all__ = [
    "ExportFailed",
    "ExportService",
    "exporter_config",
    "run_export_service",
]
