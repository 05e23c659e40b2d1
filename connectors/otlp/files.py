"""Write OTLP requests as OTLP/JSON lines, for sites with no OTLP endpoint.

Each export request becomes one line of ``metrics.jsonl`` or ``logs.jsonl`` in
the output folder, encoded by OTLP/JSON's rules: lowerCamelCase field names,
64-bit integers as decimal strings, enum values as integers, default values left
out. The OpenTelemetry Collector's file receiver and ``otelcol`` tools read this
format. Files are appended to and never rotated.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import IO

import orjson
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from connectors.otlp.exporter import ExportResult, Request, count_items

logger = logging.getLogger(__name__)


def otlp_json_line(request: Request) -> bytes:
    """Encode one request as one OTLP/JSON line (ends with a newline).

    Args:
        request: a metrics or logs export request.

    Returns:
        UTF-8 JSON text of the request followed by a newline.
    """
    data = json_format.MessageToDict(
        request,
        preserving_proto_field_name=False,
        use_integers_for_enums=True,
    )
    return orjson.dumps(data, option=orjson.OPT_APPEND_NEWLINE)


class FileSink:
    """Append OTLP/JSON lines to ``metrics.jsonl`` and ``logs.jsonl``.

    Has the same ``export_metrics``/``export_logs`` calls as the HTTP exporter.
    A call returns once the line is written and fsynced, so a caller may commit
    offsets after it. Not safe for concurrent calls from several tasks.
    """

    def __init__(self, output_dir: Path) -> None:
        """Prepare a sink writing into ``output_dir`` (created on start)."""
        self.output_dir = output_dir
        self.counters = {"requests": 0, "points": 0, "bytes": 0}
        self._files: dict[str, IO[bytes]] = {}

    async def start(self) -> None:
        """Create the folder and open both files for appending."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics", "logs"):
            if name not in self._files:
                self._files[name] = (self.output_dir / f"{name}.jsonl").open("ab")
        logger.info("OTLP/JSON file sink started output_dir=%s", self.output_dir)

    async def stop(self) -> None:
        """Close both files."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    async def __aenter__(self) -> FileSink:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def export_metrics(
        self, request: ExportMetricsServiceRequest
    ) -> ExportResult:
        """Append a metrics request to ``metrics.jsonl``.

        Returns:
            The points written; a file sink rejects nothing.
        """
        return await self._write("metrics", request)

    async def export_logs(self, request: ExportLogsServiceRequest) -> ExportResult:
        """Append a logs request to ``logs.jsonl``.

        Returns:
            The log records written; a file sink rejects nothing.
        """
        return await self._write("logs", request)

    async def _write(self, name: str, request: Request) -> ExportResult:
        items = count_items(request)
        if items == 0:
            return ExportResult(items=0, rejected=0, requests=0)
        handle = self._files.get(name)
        if handle is None:
            raise RuntimeError("FileSink.start() must be awaited before exporting")
        line = otlp_json_line(request)
        await asyncio.to_thread(_append, handle, line)
        self.counters["requests"] += 1
        self.counters["points"] += items
        self.counters["bytes"] += len(line)
        return ExportResult(items=items, rejected=0, requests=1)


def _append(handle: IO[bytes], line: bytes) -> None:
    handle.write(line)
    handle.flush()
    os.fsync(handle.fileno())


__all__ = ["FileSink", "otlp_json_line"]
