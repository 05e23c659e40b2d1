"""Send encoded OTLP requests to a receiver over OTLP/HTTP (protobuf).

The exporter exists so the rest of the pipeline can treat "the cloud accepted
this batch" as one awaitable call. It compresses (gzip, zstd, lz4 frame or
none), splits requests that are too large, and retries as the OTLP/HTTP
specification says: 429, 502, 503 and 504 with exponential backoff and jitter,
honouring ``Retry-After`` in seconds or as an HTTP date; any other error status
is final. A receiver that cannot be reached (connection refused, timeout) is
retried with capped backoff, forever by default: that is how the export service
pauses consumption while the link is down, leaving the backlog in Kafka.

Errors: :class:`ExportError` is the only exception raised on purpose; its
``retriable`` attribute says whether sending the same data later could succeed.
It derives from ``Exception`` only, because connectors import nothing from
``streams``; the export service translates it at its boundary.

It deliberately does not batch by age, hold records or commit anything: that is
the export service's job. Partial success is counted and logged, never retried.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import lz4.frame
import zstandard
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.logs.v1.logs_pb2 import ResourceLogs
from opentelemetry.proto.metrics.v1.metrics_pb2 import ResourceMetrics, ScopeMetrics

from connectors.otlp.encode import (
    count_log_records,
    count_metric_points,
    metric_points,
)

logger = logging.getLogger(__name__)

Codec = Literal["gzip", "zstd", "lz4", "none"]
CODECS: tuple[Codec, ...] = ("gzip", "zstd", "lz4", "none")
Request = ExportMetricsServiceRequest | ExportLogsServiceRequest

RETRIABLE_STATUSES = frozenset({429, 502, 503, 504})
MIB = 1024 * 1024
# Common receiver limits: 4 MiB compressed (gRPC's default message size, which
# many gateways copy) and 20 MiB decompressed (the collector's default body cap).
MAX_COMPRESSED_BYTES = 4 * MIB
MAX_UNCOMPRESSED_BYTES = 20 * MIB - 1


class ExportError(Exception):
    """An export request that did not succeed.

    Attributes:
        retriable: True when the same data may succeed later (the receiver was
            unreachable or asked to retry); False when it never will as sent.
        status: the HTTP status, or None when no response came.
    """

    def __init__(self, message: str, *, retriable: bool, status: int | None = None):
        super().__init__(message)
        self.retriable = retriable
        self.status = status


@dataclass(frozen=True, slots=True)
class ExporterConfig:
    """How to reach the receiver and how hard to try.

    Attributes:
        endpoint: base URL, e.g. ``http://127.0.0.1:4318``; ``/v1/metrics`` and
            ``/v1/logs`` are appended.
        compression: codec of request bodies.
        headers: extra HTTP headers (e.g. authorization); never logged or shown
            in ``repr``.
        ca_file: CA bundle to verify the receiver's TLS certificate, or None for
            the system's.
        timeout_s: connect, read and write timeout of one request.
        initial_backoff_s: first retry delay before jitter.
        max_backoff_s: cap of the retry delay after an HTTP 429/502/503/504.
        unreachable_max_backoff_s: cap of the retry delay while the receiver
            cannot be reached.
        max_retry_after_s: a longer ``Retry-After`` is cut to this.
        max_attempts: attempts per request before a retriable
            :class:`ExportError`; None retries forever.
        max_compressed_bytes: a larger compressed body is split before sending.
        max_uncompressed_bytes: a larger serialized body is split before sending.
    """

    endpoint: str
    compression: Codec = "gzip"
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    ca_file: Path | None = None
    timeout_s: float = 10.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    unreachable_max_backoff_s: float = 60.0
    max_retry_after_s: float = 300.0
    max_attempts: int | None = None
    max_compressed_bytes: int = MAX_COMPRESSED_BYTES
    max_uncompressed_bytes: int = MAX_UNCOMPRESSED_BYTES


@dataclass(slots=True)
class ExportCounters:
    """What the exporter did since it started. Not safe across threads."""

    points_by_codec: dict[str, int] = field(default_factory=dict)
    bytes_by_codec: dict[str, int] = field(default_factory=dict)
    uncompressed_bytes: int = 0
    requests: int = 0
    retries: int = 0
    rejected_data_points: int = 0
    rejected_log_records: int = 0
    splits: int = 0
    codec_fallbacks: int = 0
    failed_requests: int = 0

    def snapshot(self) -> dict[str, object]:
        """Return a copy as plain values, for logs and the service's status."""
        return {
            "points_by_codec": dict(self.points_by_codec),
            "bytes_by_codec": dict(self.bytes_by_codec),
            "uncompressed_bytes": self.uncompressed_bytes,
            "requests": self.requests,
            "retries": self.retries,
            "rejected_data_points": self.rejected_data_points,
            "rejected_log_records": self.rejected_log_records,
            "splits": self.splits,
            "codec_fallbacks": self.codec_fallbacks,
            "failed_requests": self.failed_requests,
        }


@dataclass(frozen=True, slots=True)
class ExportResult:
    """Outcome of one successful export call (possibly several requests).

    Attributes:
        items: data points or log records sent.
        rejected: how many of them the receiver reported as rejected.
        requests: HTTP requests that ended in a 2xx.
    """

    items: int
    rejected: int
    requests: int


def compress(body: bytes, codec: Codec) -> bytes:
    """Compress a request body with the codec's HTTP content coding.

    Args:
        body: serialized protobuf.
        codec: ``gzip``, ``zstd``, ``lz4`` (frame format) or ``none``.

    Returns:
        The bytes to send.
    """
    if codec == "gzip":
        # Level 6: zlib's default; 9 costs about twice the CPU for ~1% less.
        return gzip.compress(body, compresslevel=6, mtime=0)
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(body)
    if codec == "lz4":
        return bytes(lz4.frame.compress(body))
    return body


def decompress(body: bytes, codec: str) -> bytes:
    """Undo :func:`compress` (tests and fake receivers use this).

    Raises:
        ValueError: for an unknown codec.
    """
    if codec in ("gzip", "x-gzip"):
        return gzip.decompress(body)
    if codec == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    if codec == "lz4":
        return bytes(lz4.frame.decompress(body))
    if codec in ("none", "identity", ""):
        return body
    raise ValueError(f"content encoding must be gzip, zstd, lz4 or none, got {codec}")


def split_request(request: Request) -> tuple[Request, Request]:
    """Split a request into two holding about half of its items each.

    Resources, scopes and metrics are copied into whichever half holds some of
    their items, so each half is a valid request on its own.

    Args:
        request: a metrics or logs request with at least two items.

    Returns:
        The two halves, in order.
    """
    if isinstance(request, ExportMetricsServiceRequest):
        return _split_metrics(request)
    return _split_logs(request)


def count_items(request: Request) -> int:
    """Return the data points or log records in a request."""
    if isinstance(request, ExportMetricsServiceRequest):
        return count_metric_points(request)
    return count_log_records(request)


class Exporter:
    """Async OTLP/HTTP exporter with compression, splitting and retries.

    Use ``async with Exporter(config) as exporter:`` or call :meth:`start` and
    :meth:`stop`. One exporter may serve several tasks; each ``export_*`` call
    is independent. Cancelling an ``export_*`` call abandons it at once (during
    a request or a backoff sleep); the receiver may or may not have got the
    data, so the caller must treat it as not exported.

    Known limits: there is no request concurrency inside one call (halves of a
    split go one after the other) and no persistent queue: whatever the caller
    has not been told was exported is the caller's to keep.
    """

    def __init__(
        self,
        config: ExporterConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        """Prepare an exporter; nothing is opened before :meth:`start`.

        Args:
            config: endpoint, codec, limits and retry policy.
            transport: httpx transport (tests pass ``httpx.MockTransport``).
            sleep: awaited for every backoff delay, in seconds.
            wall_clock: epoch seconds, used to read ``Retry-After`` dates.
            rng: random source of the jitter; seed it for repeatable delays.
        """
        self.config = config
        self.counters = ExportCounters()
        self._transport = transport
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._codec: Codec = config.compression
        self._client: httpx.AsyncClient | None = None
        self._failing = False

    @property
    def codec(self) -> Codec:
        """The codec in use (gzip after a receiver refused the configured one)."""
        return self._codec

    async def start(self) -> None:
        """Open the HTTP client (a keep-alive connection pool)."""
        if self._client is not None:
            return
        verify: ssl.SSLContext | bool = True
        if self.config.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(self.config.ca_file))
        self._client = httpx.AsyncClient(
            base_url=self.config.endpoint.rstrip("/"),
            headers=dict(self.config.headers),
            timeout=httpx.Timeout(self.config.timeout_s),
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=4),
            verify=verify,
            transport=self._transport,
        )
        logger.info(
            "exporter started endpoint=%s compression=%s",
            _safe_url(self.config.endpoint),
            self._codec,
        )

    async def stop(self) -> None:
        """Close the HTTP client; calls in flight fail."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> Exporter:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def export_metrics(
        self, request: ExportMetricsServiceRequest
    ) -> ExportResult:
        """Export a metrics request, splitting and retrying as needed.

        Returns:
            What was sent and what the receiver rejected.

        Raises:
            ExportError: the receiver refused for good (``retriable`` False), or
                ``max_attempts`` ran out (``retriable`` True).
        """
        return await self._export(request, "/v1/metrics")

    async def export_logs(self, request: ExportLogsServiceRequest) -> ExportResult:
        """Export a logs request, splitting and retrying as needed.

        Returns:
            What was sent and what the receiver rejected.

        Raises:
            ExportError: as for :meth:`export_metrics`.
        """
        return await self._export(request, "/v1/logs")

    async def _export(self, request: Request, path: str) -> ExportResult:
        items = count_items(request)
        if items == 0:
            return ExportResult(items=0, rejected=0, requests=0)

        body = request.SerializeToString()
        payload = compress(body, self._codec)
        too_big = (
            len(body) > self.config.max_uncompressed_bytes
            or len(payload) > self.config.max_compressed_bytes
        )
        if too_big and items > 1:
            return await self._export_halves(request, path, "over the size limit")
        if too_big:
            message = f"one item is {len(body)} bytes, over the request size limit"
            raise ExportError(message, retriable=False)

        try:
            return await self._send(path, body, items)
        except _PayloadTooLarge:
            if items == 1:
                message = "the receiver answered 413 to a single item"
                raise ExportError(message, retriable=False, status=413) from None
            return await self._export_halves(request, path, "HTTP 413")

    async def _export_halves(
        self, request: Request, path: str, reason: str
    ) -> ExportResult:
        self.counters.splits += 1
        first, second = split_request(request)
        logger.debug("batch split in halves reason=%s path=%s", reason, path)
        a = await self._export(first, path)
        b = await self._export(second, path)
        return ExportResult(
            items=a.items + b.items,
            rejected=a.rejected + b.rejected,
            requests=a.requests + b.requests,
        )

    async def _send(self, path: str, body: bytes, items: int) -> ExportResult:
        client = self._client
        if client is None:
            raise RuntimeError("Exporter.start() must be awaited before exporting")
        attempt = 0
        while True:
            # 1. Send with the current codec (it may fall back to gzip below).
            attempt += 1
            codec = self._codec
            payload = compress(body, codec)
            headers = {"content-type": "application/x-protobuf"}
            if codec != "none":
                headers["content-encoding"] = codec
            try:
                response = await client.post(path, content=payload, headers=headers)
            except httpx.TransportError as exc:
                delay = self._backoff(attempt, self.config.unreachable_max_backoff_s)
                reason = f"endpoint unreachable ({type(exc).__name__})"
                await self._before_retry(attempt, delay, reason, status=None)
                continue
            status = response.status_code

            # 2. Success: count, report partial success, done.
            if 200 <= status < 300:
                sizes = (len(body), len(payload))
                rejected = self._count_success(path, response, codec, items, sizes)
                if self._failing:
                    self._failing = False
                    logger.info("export recovered path=%s attempt=%d", path, attempt)
                return ExportResult(items=items, rejected=rejected, requests=1)

            # 3. Failures the exporter can act on itself.
            if status == 413:
                raise _PayloadTooLarge
            if codec != "gzip" and _refuses_codec(response, codec):
                self._codec = "gzip"
                self.counters.codec_fallbacks += 1
                logger.warning(
                    "receiver refused compression=%s status=%d; using gzip from now on",
                    codec,
                    status,
                )
                continue
            if status in RETRIABLE_STATUSES:
                wait_s = self._retry_after(response)
                if wait_s is None:
                    wait_s = self._backoff(attempt, self.config.max_backoff_s)
                await self._before_retry(attempt, wait_s, f"HTTP {status}", status)
                continue

            # 4. Anything else is final for this data.
            self.counters.failed_requests += 1
            raise ExportError(
                f"receiver answered HTTP {status} to {path}; not retried",
                retriable=False,
                status=status,
            )

    async def _before_retry(
        self, attempt: int, delay_s: float, reason: str, status: int | None
    ) -> None:
        limit = self.config.max_attempts
        if limit is not None and attempt >= limit:
            self.counters.failed_requests += 1
            raise ExportError(
                f"export failed after {attempt} attempts: {reason}",
                retriable=True,
                status=status,
            )
        self.counters.retries += 1
        if not self._failing:
            self._failing = True
            logger.info("export failing reason=%s", reason)
        logger.warning(
            "export retry scheduled reason=%s attempt=%d delay_s=%.2f max_attempts=%s",
            reason,
            attempt,
            delay_s,
            limit if limit is not None else "unbounded",
        )
        await self._sleep(delay_s)

    def _backoff(self, attempt: int, cap_s: float) -> float:
        """Exponential delay capped at ``cap_s``, jittered into its upper half."""
        exponent = min(attempt - 1, 30)  # 2**30 already exceeds any sane cap
        growth: float = 2.0**exponent
        base = min(cap_s, self.config.initial_backoff_s * growth)
        return base * (0.5 + 0.5 * self._rng.random())

    def _retry_after(self, response: httpx.Response) -> float | None:
        value = response.headers.get("retry-after")
        if value is None:
            return None
        delay = parse_retry_after(value, now_s=self._wall_clock())
        if delay is None:
            return None
        return min(delay, self.config.max_retry_after_s)

    def _count_success(
        self,
        path: str,
        response: httpx.Response,
        codec: Codec,
        items: int,
        sizes: tuple[int, int],
    ) -> int:
        counters = self.counters
        counters.requests += 1
        counters.points_by_codec[codec] = counters.points_by_codec.get(codec, 0) + items
        counters.bytes_by_codec[codec] = (
            counters.bytes_by_codec.get(codec, 0) + sizes[1]
        )
        counters.uncompressed_bytes += sizes[0]
        rejected, message = _partial_success(path, response.content)
        if rejected:
            if path.endswith("metrics"):
                self.counters.rejected_data_points += rejected
            else:
                self.counters.rejected_log_records += rejected
            logger.warning(
                "receiver rejected part of a batch path=%s rejected=%d batch_size=%d"
                " message=%s",
                path,
                rejected,
                items,
                message[:200],
            )
        return rejected


class _PayloadTooLarge(Exception):
    """Internal: the receiver answered 413."""


def parse_retry_after(value: str, *, now_s: float) -> float | None:
    """Parse ``Retry-After`` (seconds, or an HTTP date) into seconds from now.

    Args:
        value: the header's value.
        now_s: the current time, epoch seconds.

    Returns:
        Seconds to wait (never negative), or None when the value is malformed.
    """
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_s)


def _partial_success(path: str, content: bytes) -> tuple[int, str]:
    response: ExportMetricsServiceResponse | ExportLogsServiceResponse
    try:
        if path.endswith("metrics"):
            response = ExportMetricsServiceResponse.FromString(content)
            partial = response.partial_success
            return partial.rejected_data_points, partial.error_message
        response = ExportLogsServiceResponse.FromString(content)
        return (
            response.partial_success.rejected_log_records,
            response.partial_success.error_message,
        )
    except DecodeError:
        # A 2xx whose body is not protobuf (some proxies answer JSON or text):
        # the data was accepted, and there is no partial success to read.
        return 0, ""


def _refuses_codec(response: httpx.Response, codec: str) -> bool:
    if response.status_code == 415:
        return True
    if response.status_code != 400:
        return False
    text = response.text.lower()
    return codec in text or "content-encoding" in text or "encoding" in text


def _safe_url(url: str) -> str:
    parts = httpx.URL(url)
    return str(parts.copy_with(username=None, password=None, query=None))


def _split_metrics(
    request: ExportMetricsServiceRequest,
) -> tuple[ExportMetricsServiceRequest, ExportMetricsServiceRequest]:
    halves = (ExportMetricsServiceRequest(), ExportMetricsServiceRequest())
    half = count_metric_points(request) // 2
    seen = 0
    for resource in request.resource_metrics:
        # Per half, the copy of this resource (and below, of this scope).
        copies: dict[int, ResourceMetrics] = {}
        for scope in resource.scope_metrics:
            scopes: dict[int, ScopeMetrics] = {}
            for metric in scope.metrics:
                points = metric_points(metric)
                take = max(0, min(len(points), half - seen))
                seen += len(points)
                for side, chunk in ((0, points[:take]), (1, points[take:])):
                    if not chunk:
                        continue
                    if side not in copies:
                        copies[side] = halves[side].resource_metrics.add()
                        copies[side].resource.CopyFrom(resource.resource)
                        copies[side].schema_url = resource.schema_url
                    if side not in scopes:
                        scopes[side] = copies[side].scope_metrics.add()
                        scopes[side].scope.CopyFrom(scope.scope)
                        scopes[side].schema_url = scope.schema_url
                    copy = scopes[side].metrics.add()
                    copy.CopyFrom(metric)
                    copied = metric_points(copy)
                    del copied[:]
                    copied.extend(chunk)
    return halves


def _split_logs(
    request: ExportLogsServiceRequest,
) -> tuple[ExportLogsServiceRequest, ExportLogsServiceRequest]:
    halves = (ExportLogsServiceRequest(), ExportLogsServiceRequest())
    half = count_log_records(request) // 2
    seen = 0
    for resource in request.resource_logs:
        copies: dict[int, ResourceLogs] = {}
        for scope in resource.scope_logs:
            records = scope.log_records
            take = max(0, min(len(records), half - seen))
            seen += len(records)
            for side, chunk in ((0, records[:take]), (1, records[take:])):
                if not chunk:
                    continue
                if side not in copies:
                    copies[side] = halves[side].resource_logs.add()
                    copies[side].resource.CopyFrom(resource.resource)
                    copies[side].schema_url = resource.schema_url
                new_scope = copies[side].scope_logs.add()
                new_scope.scope.CopyFrom(scope.scope)
                new_scope.schema_url = scope.schema_url
                new_scope.log_records.extend(chunk)
    return halves


__all__ = [
    "CODECS",
    "Codec",
    "ExportCounters",
    "ExportError",
    "ExportResult",
    "Exporter",
    "ExporterConfig",
    "compress",
    "count_items",
    "decompress",
    "parse_retry_after",
    "split_request",
]
