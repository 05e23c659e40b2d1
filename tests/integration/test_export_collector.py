"""The export service against a real collector and against a flaky fake receiver."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections import Counter

import orjson
import pytest

from connectors.otlp.exporter import (
    CODECS,
    Exporter,
    ExporterConfig,
    count_items,
    decompress,
)
from models.records import AnomalyScore, Decision, WindowSummary
from streams.config import Settings
from streams.export import SOURCE_TOPICS, ExportService
from tests.integration._collector import (
    OTLP_ENDPOINT,
    committed_offsets,
    delete_topics,
    produce,
    received_logs,
    received_points,
    require_collector,
    require_kafka,
    wait_for,
)
from tests.integration.brokers import KAFKA, consume

pytestmark = pytest.mark.integration

BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SERVICE_TIMEOUT_S = 60.0
# The fake receiver's outage: refused connections, then 503s. Kept short here;
# TEST_OUTAGE_S=60 runs the same test with a minute-long outage.
OUTAGE_S = float(os.environ.get("TEST_OUTAGE_S", "1.5"))


def make_records(run_id: str, windows: int = 6, devices: int = 3):
    summaries = [
        WindowSummary(
            device_id=f"{run_id}-dev{d}",
            metric="temperature",
            window_start_ms=BASE_MS + w * 60_000,
            window_end_ms=BASE_MS + (w + 1) * 60_000,
            count=10 + w,
            sum=100.0 + w + d,
            min=1.0 + d,
            max=50.0 + w,
            mean=(100.0 + w + d) / (10 + w),
            last=3.0,
            p50=20.0 + d,
            p95=45.0 + w,
            p99=49.5 + w,
            unit="C",
        )  # fmt: skip
        for d in range(devices)
        for w in range(windows)
    ]
    anomalies = [
        AnomalyScore(f"{run_id}-dev{d}", "temperature", BASE_MS + 1_000 * d,
                     90.0 + d, 0.95, 0.9, "hst", unit="C")
        for d in range(devices)
    ]  # fmt: skip
    decisions = [
        Decision(f"rule-{d}", f"{run_id}-dev{d}", "temperature", "stop", 2, 0.8,
                 BASE_MS + 2_000 * d, BASE_MS + 2_000 * d + 5, evidence={"max": 99.0})
        for d in range(devices)
    ]  # fmt: skip
    return summaries, anomalies, decisions


def settings_for(prefix: str, **kw) -> Settings:
    return Settings(
        kafka_bootstrap=KAFKA,
        topic_prefix=prefix,
        partitions=2,
        export_max_batch_age_s=0.3,
        **kw,
    )


@pytest.fixture
def make_settings():
    """Build a run's settings; delete exactly that run's topics afterwards."""
    made: list[Settings] = []

    def make(prefix: str, **kw) -> Settings:
        made.append(settings_for(prefix, **kw))
        return made[-1]

    yield make
    if made:
        names = [s.topic(n) for s in made for n in (*SOURCE_TOPICS, "dead-letters")]
        asyncio.run(delete_topics(names))


async def publish(settings: Settings, summaries, anomalies, decisions) -> None:
    items = [
        (settings.topic("window-summaries"), s.device_id.encode(), s.to_json())
        for s in summaries
    ]
    items += [
        (settings.topic("anomalies"), a.device_id.encode(), a.to_json())
        for a in anomalies
    ]
    items += [
        (settings.topic("decisions"), d.device_id.encode(), d.to_json())
        for d in decisions
    ]
    await produce(items)


async def export_all(service: ExportService, total: int) -> None:
    await service.start()
    try:
        await wait_for(
            lambda: service.counters.records >= total,
            timeout_s=SERVICE_TIMEOUT_S,
            what=f"{total} records exported (have {service.counters.records})",
        )
    finally:
        await service.stop()


@pytest.mark.parametrize("codec", CODECS)
def test_export_service_delivers_every_point_to_the_collector_once(
    codec, make_settings
):
    require_kafka()
    require_collector()
    run_id = f"x{uuid.uuid4().hex[:8]}{codec}"
    settings = make_settings(
        f"{run_id}-", otlp_endpoint=OTLP_ENDPOINT, otlp_compression=codec
    )
    summaries, anomalies, decisions = make_records(run_id)
    devices = {s.device_id for s in summaries}
    total = len(summaries) + len(anomalies) + len(decisions)

    async def scenario() -> ExportService:
        await publish(settings, [], [], [])  # nothing; topics come from start()
        service = ExportService(settings)
        await service.start()
        await service.stop()
        await publish(settings, summaries, anomalies, decisions)
        service = ExportService(settings)
        await export_all(service, total)
        return service

    service = asyncio.run(scenario())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        points, logs = received_points(devices), received_logs(devices)
        if len(points) >= len(summaries) and len(logs) >= 2 * len(anomalies):
            break
        time.sleep(0.2)

    assert service.snapshot()["sink"]["points_by_codec"] == {
        codec: len(summaries) + 2 * len(anomalies)
    }
    keyed = Counter((p["device_id"], p["startTimeUnixNano"]) for p in points)
    assert all(n == 1 for n in keyed.values()), "a point arrived twice"
    by_key = {(p["device_id"], int(p["startTimeUnixNano"])): p for p in points}
    assert len(by_key) == len(summaries)
    for s in summaries:
        point = by_key[(s.device_id, s.window_start_ms * 1_000_000)]
        assert int(point["timeUnixNano"]) == s.window_end_ms * 1_000_000
        assert int(point["count"]) == s.count
        assert point["sum"] == s.sum
        assert point["unit"] == "Cel"
        quantiles = {
            q.get("quantile", 0.0): q["value"] for q in point["quantileValues"]
        }
        assert quantiles == {0.0: s.min, 0.5: s.p50, 0.95: s.p95, 0.99: s.p99,
                             1.0: s.max}  # fmt: skip

    events = Counter((r["device_id"], r["eventName"]) for r in logs)
    assert events == Counter(
        {(d, e): 1 for d in devices for e in ("edge.anomaly", "edge.decision")}
    )
    for a in anomalies:
        record = next(
            r for r in logs
            if r["device_id"] == a.device_id and r["eventName"] == "edge.anomaly"
        )  # fmt: skip
        assert int(record["timeUnixNano"]) == a.time_ms * 1_000_000
        assert record["severityText"] == "WARN"
        assert record["attrs"]["edge.anomaly_score"] == a.anomaly_score


class FlakyReceiver:
    """OTLP/HTTP on 127.0.0.1: closed, then 503 + Retry-After, then 200."""

    def __init__(self, port: int, *, busy_answers: int, retry_after_s: int) -> None:
        self.port = port
        self.busy_answers = busy_answers
        self.retry_after_s = retry_after_s
        self.accepted_points = 0
        self.first_ok_at: float | None = None
        self.answers: list[int] = []
        self._server: asyncio.AbstractServer | None = None

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader, writer) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status = self._answer(lines[0], headers, body)
                extra = ""
                if status == 503:
                    extra = f"Retry-After: {self.retry_after_s}\r\n"
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n{extra}\r\n".encode()
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, request_line: str, headers: dict[str, str], body: bytes) -> int:
        if self.busy_answers > 0:
            self.busy_answers -= 1
            self.answers.append(503)
            return 503
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
        )

        raw = decompress(body, headers.get("content-encoding", "none"))
        if "/v1/metrics" in request_line:
            self.accepted_points += count_items(
                ExportMetricsServiceRequest.FromString(raw)
            )
        if self.first_ok_at is None:
            self.first_ok_at = time.monotonic()
        self.answers.append(200)
        return 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_export_service_pauses_while_receiver_is_down_and_commits_only_after_2xx(
    make_settings,
):
    require_kafka()
    run_id = f"f{uuid.uuid4().hex[:8]}"
    port = free_port()
    batch_points = 10
    settings = make_settings(
        f"{run_id}-",
        otlp_endpoint=f"http://127.0.0.1:{port}",
        export_max_batch_points=batch_points,
    )
    summaries, _, _ = make_records(run_id, windows=15, devices=3)  # 45 points
    receiver = FlakyReceiver(port, busy_answers=2, retry_after_s=1)
    delays: list[float] = []

    async def recorded_sleep(delay_s: float) -> None:
        delays.append(delay_s)
        await asyncio.sleep(delay_s)

    exporter = Exporter(
        ExporterConfig(
            endpoint=settings.otlp_endpoint or "",
            initial_backoff_s=0.1,
            unreachable_max_backoff_s=0.4,
            timeout_s=2.0,
        ),
        sleep=recorded_sleep,
    )
    service = ExportService(settings, sink=exporter)

    async def scenario() -> dict:
        await service.start()
        await publish(settings, summaries, [], [])
        # 1. Receiver down: the service retries and commits nothing.
        outage_end = time.monotonic() + OUTAGE_S
        while time.monotonic() < outage_end:
            assert await committed_offsets(service.group_id) == {}
            await asyncio.sleep(0.2)
        assert exporter.counters.retries >= 2
        await service.refresh_lag()
        lag = service.snapshot()["lag_by_topic"]
        assert lag[settings.topic("window-summaries")] == len(summaries)
        # 2. Receiver up but busy (503 + Retry-After), then accepting.
        await receiver.open()
        while receiver.first_ok_at is None:
            assert await committed_offsets(service.group_id) == {}
            await asyncio.sleep(0.05)
        await wait_for(
            lambda: service.counters.records >= len(summaries),
            timeout_s=SERVICE_TIMEOUT_S,
            what="every summary exported",
        )
        await service.stop()
        await receiver.close()
        return await committed_offsets(service.group_id)

    try:
        committed = asyncio.run(scenario())
    finally:
        asyncio.run(receiver.close())

    assert receiver.accepted_points == len(summaries)
    assert sum(committed.values()) == len(summaries)
    assert receiver.answers[:2] == [503, 503]
    assert delays.count(1.0) == 2, f"Retry-After not honoured: {delays}"
    unreachable_waits = [d for d in delays if d != 1.0]
    assert unreachable_waits and max(unreachable_waits) <= 0.4
    assert service.counters.max_records_held <= batch_points


def test_export_service_writes_otlp_json_files_and_dead_letters_bad_records(
    tmp_path, make_settings
):
    require_kafka()
    run_id = f"j{uuid.uuid4().hex[:8]}"
    settings = make_settings(f"{run_id}-", otlp_output_dir=tmp_path)
    summaries, anomalies, decisions = make_records(run_id, windows=2, devices=2)
    bad = [
        (settings.topic("window-summaries"), b"dev-x", b"{not json"),
        (settings.topic("anomalies"), b"dev-y", b'{"device_id": "dev-y"}'),
    ]
    total = len(summaries) + len(anomalies) + len(decisions) + len(bad)
    service = ExportService(settings)

    async def scenario() -> dict:
        await service.start()
        await publish(settings, summaries, anomalies, decisions)
        await produce(bad)
        await wait_for(
            lambda: service.counters.records >= total,
            timeout_s=SERVICE_TIMEOUT_S,
            what="every record handled",
        )
        await service.stop()
        return await committed_offsets(service.group_id)

    committed = asyncio.run(scenario())
    letters = consume(
        [settings.topic("dead-letters")], until=lambda r: len(r) >= 2, timeout_s=20
    )

    assert sum(committed.values()) == total
    assert service.counters.dead_letters == 2
    reasons = sorted(orjson.loads(r.value)["reason"].split(" ")[0] for r in letters)
    assert reasons == ["anomalies", "window-summaries"]
    assert all(orjson.loads(r.value)["stage"] == "export" for r in letters)
    metric_lines = (tmp_path / "metrics.jsonl").read_bytes().splitlines()
    points = [
        p
        for line in metric_lines
        for rm in orjson.loads(line)["resourceMetrics"]
        for sm in rm["scopeMetrics"]
        for m in sm["metrics"]
        for p in m["summary"]["dataPoints"]
    ]
    assert sorted(int(p["startTimeUnixNano"]) for p in points) == sorted(
        s.window_start_ms * 1_000_000 for s in summaries
    )
    log_lines = (tmp_path / "logs.jsonl").read_bytes().splitlines()
    events = [
        r["eventName"]
        for line in log_lines
        for rl in orjson.loads(line)["resourceLogs"]
        for sl in rl["scopeLogs"]
        for r in sl["logRecords"]
    ]
    assert Counter(events) == {"edge.anomaly": 2, "edge.decision": 2}
    assert set(service.snapshot()["lag_by_topic"].values()) <= {0}
