from __future__ import annotations

import asyncio
import email.utils
import random
from collections.abc import Callable

import httpx
import orjson
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsPartialSuccess,
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsPartialSuccess,
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from connectors.otlp.encode import ResourceInfo, encode_logs, encode_metrics
from connectors.otlp.exporter import (
    CODECS,
    Exporter,
    ExporterConfig,
    ExportError,
    count_items,
    decompress,
    parse_retry_after,
    split_request,
)
from connectors.otlp.files import FileSink
from models.records import AnomalyScore, Decision, WindowSummary

INFO = ResourceInfo(service_instance_id="edge-a", site="plant-7")
NOW_S = 1_800_000_000.0


def summaries(n: int, devices: int = 3) -> list[WindowSummary]:
    return [
        WindowSummary(
            device_id=f"d{i % devices}",
            metric=f"m{i % 2}",
            window_start_ms=1_000 * i,
            window_end_ms=1_000 * (i + 1),
            count=i + 1,
            sum=float(i),
            min=0.0,
            max=float(i),
            mean=0.5,
            last=1.0,
            p50=0.5,
            p95=0.9,
            p99=0.99,
        )  # fmt: skip
        for i in range(n)
    ]


def metrics(n: int = 10) -> ExportMetricsServiceRequest:
    return encode_metrics(summaries(n), resource_info=INFO)


class Receiver:
    """A scripted OTLP receiver behind httpx.MockTransport."""

    def __init__(self, answer: Callable[[httpx.Request, bytes], httpx.Response]):
        self.answer = answer
        self.requests: list[tuple[httpx.Request, bytes]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        encoding = request.headers.get("content-encoding", "none")
        body = decompress(request.content, encoding)
        self.requests.append((request, body))
        return self.answer(request, body)

    def points(self) -> int:
        total = 0
        for request, body in self.requests:
            if request.url.path == "/v1/metrics":
                total += count_items(ExportMetricsServiceRequest.FromString(body))
        return total


def ok(request: httpx.Request, body: bytes) -> httpx.Response:
    return httpx.Response(200, content=b"")


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)


def exporter(receiver: Receiver, sleeps: Sleeps | None = None, **config) -> Exporter:
    return Exporter(
        ExporterConfig(endpoint="http://collector.test:4318", **config),
        transport=httpx.MockTransport(receiver),
        sleep=sleeps or Sleeps(),
        wall_clock=lambda: NOW_S,
        rng=random.Random(7),
    )


def run(coro):
    return asyncio.run(coro)


async def export_once(exp: Exporter, request) -> object:
    async with exp:
        if isinstance(request, ExportLogsServiceRequest):
            return await exp.export_logs(request)
        return await exp.export_metrics(request)


@pytest.mark.parametrize("codec", CODECS)
def test_exporter_body_decodes_back_for_each_codec(codec):
    receiver = Receiver(ok)
    request = metrics(20)

    result = run(export_once(exporter(receiver, compression=codec), request))

    sent, body = receiver.requests[0]
    assert ExportMetricsServiceRequest.FromString(body) == request
    assert sent.headers["content-type"] == "application/x-protobuf"
    assert sent.headers.get("content-encoding") == (None if codec == "none" else codec)
    assert result.items == 20


def test_exporter_counts_points_and_bytes_per_codec():
    receiver = Receiver(ok)
    exp = exporter(receiver, compression="zstd")

    run(export_once(exp, metrics(12)))

    snap = exp.counters.snapshot()
    assert snap["points_by_codec"] == {"zstd": 12}
    assert snap["bytes_by_codec"]["zstd"] == len(receiver.requests[0][0].content)
    assert snap["requests"] == 1


def test_exporter_does_not_retry_400():
    receiver = Receiver(lambda r, b: httpx.Response(400, text="bad data point"))
    sleeps = Sleeps()

    with pytest.raises(ExportError) as caught:
        run(export_once(exporter(receiver, sleeps), metrics()))

    assert caught.value.retriable is False
    assert caught.value.status == 400
    assert len(receiver.requests) == 1
    assert sleeps.delays == []


def test_exporter_splits_batch_in_halves_on_413():
    def answer(request: httpx.Request, body: bytes) -> httpx.Response:
        too_many = count_items(ExportMetricsServiceRequest.FromString(body)) > 3
        return httpx.Response(413 if too_many else 200)

    receiver = Receiver(answer)
    exp = exporter(receiver)

    result = run(export_once(exp, metrics(10)))

    assert result.items == 10
    assert receiver.points() == 10 + 10 + 5 + 5  # refused ones are counted too
    accepted = [
        ExportMetricsServiceRequest.FromString(b)
        for _, b in receiver.requests
        if count_items(ExportMetricsServiceRequest.FromString(b)) <= 3
    ]
    assert sum(count_items(r) for r in accepted) == 10
    assert exp.counters.splits >= 3


def test_split_request_keeps_every_point_once_with_its_resource():
    request = metrics(9)

    first, second = split_request(request)

    assert (count_items(first), count_items(second)) == (4, 5)
    seen = []
    for half in (first, second):
        for resource in half.resource_metrics:
            device = resource.resource.attributes[3].value.string_value
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.summary.data_points:
                        seen.append((device, metric.name, point.start_time_unix_nano))
    expected = sorted(
        (s.device_id, s.metric, s.window_start_ms * 1_000_000) for s in summaries(9)
    )
    assert sorted(seen) == expected


def test_split_request_halves_logs():
    records = [AnomalyScore(f"d{i % 2}", "m", i, 1.0, 0.9, 0.5, "x") for i in range(5)]
    request = encode_logs(records, resource_info=INFO)

    first, second = split_request(request)

    assert (count_items(first), count_items(second)) == (2, 3)


def test_exporter_splits_before_sending_when_over_the_compressed_limit():
    receiver = Receiver(ok)
    exp = exporter(receiver, compression="none", max_compressed_bytes=400)

    result = run(export_once(exp, metrics(16)))

    assert result.items == 16
    assert all(len(r.content) <= 400 for r, _ in receiver.requests)
    assert receiver.points() == 16


def test_exporter_counts_partial_success_without_retrying():
    response = ExportMetricsServiceResponse(
        partial_success=ExportMetricsPartialSuccess(
            rejected_data_points=3, error_message="bad units"
        )
    )
    receiver = Receiver(
        lambda r, b: httpx.Response(200, content=response.SerializeToString())
    )
    exp = exporter(receiver)

    result = run(export_once(exp, metrics(10)))

    assert result.rejected == 3
    assert exp.counters.rejected_data_points == 3
    assert len(receiver.requests) == 1


def test_exporter_counts_rejected_log_records():
    response = ExportLogsServiceResponse(
        partial_success=ExportLogsPartialSuccess(rejected_log_records=1)
    )
    receiver = Receiver(
        lambda r, b: httpx.Response(200, content=response.SerializeToString())
    )
    exp = exporter(receiver)
    request = encode_logs(
        [Decision("r", "d", "m", "a", 1, 1.0, 1, 2)], resource_info=INFO
    )

    run(export_once(exp, request))

    assert exp.counters.rejected_log_records == 1


def scripted(*statuses: tuple[int, dict[str, str]]):
    answers = list(statuses)

    def answer(request: httpx.Request, body: bytes) -> httpx.Response:
        status, headers = answers.pop(0) if answers else (200, {})
        return httpx.Response(status, headers=headers)

    return answer


def test_exporter_honours_retry_after_in_seconds():
    receiver = Receiver(
        scripted((503, {"Retry-After": "7"}), (429, {"Retry-After": "2"}))
    )
    sleeps = Sleeps()
    exp = exporter(receiver, sleeps)

    run(export_once(exp, metrics()))

    assert sleeps.delays == [7.0, 2.0]
    assert exp.counters.retries == 2
    assert len(receiver.requests) == 3


def test_exporter_honours_retry_after_as_http_date():
    when = email.utils.formatdate(NOW_S + 12, usegmt=True)
    receiver = Receiver(scripted((429, {"Retry-After": when})))
    sleeps = Sleeps()

    run(export_once(exporter(receiver, sleeps), metrics()))

    assert sleeps.delays == [12.0]


def test_exporter_caps_retry_after():
    receiver = Receiver(scripted((503, {"Retry-After": "86400"})))
    sleeps = Sleeps()

    run(export_once(exporter(receiver, sleeps, max_retry_after_s=30.0), metrics()))

    assert sleeps.delays == [30.0]


def test_parse_retry_after_rejects_garbage_and_past_dates_wait_zero():
    past = email.utils.formatdate(NOW_S - 60, usegmt=True)

    assert parse_retry_after("soon", now_s=NOW_S) is None
    assert parse_retry_after(past, now_s=NOW_S) == 0.0


def test_exporter_backoff_grows_exponentially_and_stays_under_the_cap():
    receiver = Receiver(scripted(*[(502, {})] * 12))
    sleeps = Sleeps()

    exp = exporter(receiver, sleeps, initial_backoff_s=0.5, max_backoff_s=8.0)

    run(export_once(exp, metrics()))

    caps = [min(8.0, 0.5 * 2**i) for i in range(12)]
    assert len(sleeps.delays) == 12
    for delay, cap in zip(sleeps.delays, caps, strict=True):
        assert cap / 2 <= delay <= cap
    assert max(sleeps.delays) <= 8.0


def test_exporter_gives_up_with_a_retriable_error_after_max_attempts():
    receiver = Receiver(scripted(*[(504, {})] * 10))
    sleeps = Sleeps()

    with pytest.raises(ExportError) as caught:
        run(export_once(exporter(receiver, sleeps, max_attempts=3), metrics()))

    assert caught.value.retriable is True
    assert len(receiver.requests) == 3
    assert len(sleeps.delays) == 2


def test_exporter_retries_unreachable_endpoint_with_its_own_cap():
    failures = iter(range(6))

    def answer(request: httpx.Request, body: bytes) -> httpx.Response:
        if next(failures, None) is not None:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200)

    receiver = Receiver(answer)
    sleeps = Sleeps()
    exp = exporter(
        receiver, sleeps, initial_backoff_s=1.0, unreachable_max_backoff_s=4.0
    )

    result = run(export_once(exp, metrics(5)))

    assert result.items == 5
    assert len(sleeps.delays) == 6
    assert max(sleeps.delays) <= 4.0
    assert sleeps.delays[-1] >= 2.0


@pytest.mark.parametrize(
    ("status", "text"),
    [(415, ""), (400, "unsupported content-encoding: zstd")],
)
def test_exporter_falls_back_to_gzip_when_the_receiver_refuses_the_codec(status, text):
    def answer(request: httpx.Request, body: bytes) -> httpx.Response:
        if request.headers.get("content-encoding") == "zstd":
            return httpx.Response(status, text=text)
        return httpx.Response(200)

    receiver = Receiver(answer)
    exp = exporter(receiver, compression="zstd")

    async def twice() -> None:
        async with exp:
            await exp.export_metrics(metrics(4))
            await exp.export_metrics(metrics(4))

    run(twice())

    encodings = [r.headers.get("content-encoding") for r, _ in receiver.requests]
    assert encodings == ["zstd", "gzip", "gzip"]
    assert exp.codec == "gzip"
    assert exp.counters.codec_fallbacks == 1


def test_exporter_never_shows_its_headers():
    config = ExporterConfig(
        endpoint="http://x", headers={"authorization": "Bearer s3cret"}
    )

    assert "s3cret" not in repr(config)


def test_exporter_sends_configured_headers():
    receiver = Receiver(ok)

    run(
        export_once(
            exporter(receiver, headers={"authorization": "Bearer t"}), metrics()
        )
    )

    assert receiver.requests[0][0].headers["authorization"] == "Bearer t"


def test_file_sink_writes_one_otlp_json_line_per_request(tmp_path):
    request = metrics(2)
    sink = FileSink(tmp_path)

    async def write() -> None:
        async with sink:
            await sink.export_metrics(request)
            await sink.export_logs(
                encode_logs(
                    [Decision("r", "d", "m", "a", 1, 1.0, 1, 2)], resource_info=INFO
                )
            )

    run(write())

    lines = (tmp_path / "metrics.jsonl").read_bytes().splitlines()
    assert len(lines) == 1
    data = orjson.loads(lines[0])
    point = data["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["summary"][
        "dataPoints"
    ][0]
    assert point["timeUnixNano"] == "1000000000"
    assert point["count"] == "1"
    log = orjson.loads((tmp_path / "logs.jsonl").read_bytes())
    record = log["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]
    assert record["severityNumber"] == 9
    assert record["eventName"] == "edge.decision"
