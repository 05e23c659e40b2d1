"""``edge-otlp demo``: the whole pipeline on real NAB data, with its accounting.

The demo starts the local stack's servers that are not running, a bridge and a
worker for this run, replays NAB series over MQTT as fast as the broker takes
them (a machine's temperature, road traffic sensors and a few more), waits until
every reading has been processed and exported to the collector, stops what it
started and prints a summary. The summary proves that nothing was lost: the
counts of the window summaries the collector received plus the dead-lettered
readings must equal the readings published, else the demo fails.

Every run has its own Kafka topic prefix, MQTT topic pattern, client ids and
``service.instance.id``, so runs never see each other's data; the collector's
output file is shared by every run, so the demo reads only the lines written
after it started and only the resources of its own instance id. Its own topics
are deleted at the end unless asked to keep them.

It does not measure throughput (``edge-otlp bench`` does) and draws the anomaly
score curve offline with :func:`streams.scorecsv.score_csv`, the worker's own
detector code path, because the worker publishes only the scores above the
threshold.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from connectors.otlp.encode import ResourceInfo, encode_logs, encode_metrics
from connectors.otlp.exporter import Codec, compress
from models.detectors import DEFAULT_THRESHOLD, DetectorSpec
from models.nab import parse_windows
from models.records import AnomalyScore, DeadLetter, Decision, WindowSummary
from streams.config import PROJECT_ROOT, PipelineError, Settings
from streams.export import SOURCE_TOPICS
from streams.plots import SeriesPlot

logger = logging.getLogger(__name__)

NAB_DIR = PROJECT_ROOT / "data" / "nab"
# Both use cases, plus series whose devices no rule targets. Traffic files of one
# sensor (occupancy_t4013, speed_t4013) become one device, so the congestion rule
# sees both metrics.
FULL_FILES = (
    "realKnownCause/machine_temperature_system_failure.csv",
    "realKnownCause/ambient_temperature_system_failure.csv",
    "realKnownCause/cpu_utilization_asg_misconfiguration.csv",
    "realTraffic/occupancy_t4013.csv",
    "realTraffic/speed_t4013.csv",
    "realTraffic/occupancy_6005.csv",
    "realTraffic/speed_6005.csv",
    "realTraffic/TravelTime_387.csv",
)
QUICK_FILES = (
    "realKnownCause/machine_temperature_system_failure.csv",
    "realTraffic/speed_t4013.csv",
)
QUICK_ROWS = 600
CODECS: tuple[Codec, ...] = ("none", "gzip", "zstd", "lz4")
# NAB samples every 5 minutes: an hour holds 12 readings, and a reading more than
# two samples behind its series is late. The replay plays years in minutes and
# then stops, so its last windows close at the idle timeout, not an hour later.
DEMO_ENV = {
    "EDGE_WINDOW_SIZE_S": "3600",
    "EDGE_ALLOWED_LATENESS_S": "600",
    "EDGE_IDLE_TIMEOUT_S": "5",
    "EDGE_IDLE_CLOSE": "all",
    "EDGE_OTLP_COMPRESSION": "gzip",
    "EDGE_LOG_SUMMARY_INTERVAL_S": "10",
}
READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 30.0
# The collector flushes its file every 100 ms; a few polls without growth mean
# every accepted request is on disk.
COLLECTOR_QUIET_S = 2.0
POLL_S = 1.0


class DemoError(PipelineError):
    """The demo could not finish, or its accounting does not add up."""


@dataclass(frozen=True)
class DemoOptions:
    """What one demo run replays and where it writes.

    Attributes:
        files: NAB series paths relative to ``data/nab/data``.
        rows: replay at most this many rows per file (None: all).
        out_dir: PNGs, ``summary.json`` and the processes' logs go here.
        timeout_s: bound on the wait for processing and export after the replay.
        manage_stack: start the local stack's missing servers (and stop them).
        collector_output: the collector's OTLP/JSON file (None: the stack's).
        keep_topics: leave this run's Kafka topics in place.
    """

    files: tuple[str, ...] = FULL_FILES
    rows: int | None = None
    out_dir: Path = Path("out/demo")
    timeout_s: float = 480.0
    manage_stack: bool = True
    collector_output: Path | None = None
    keep_topics: bool = False


@dataclass(frozen=True)
class DemoRun:
    """The names that keep one run apart from every other."""

    run_id: str
    web_port: int

    @property
    def prefix(self) -> str:
        """Kafka topic prefix of this run."""
        return f"demo-{self.run_id}-"

    @property
    def mqtt_topic_pattern(self) -> str:
        """MQTT topic pattern the replay publishes to and the bridge reads."""
        return f"demo-{self.run_id}/devices/{{device_id}}/telemetry"

    @property
    def worker_id(self) -> str:
        """Worker id; also the tail of the exporter's ``service.instance.id``."""
        return f"demo-{self.run_id}"

    def topic(self, name: str) -> str:
        """Full Kafka topic name of a pipeline topic in this run."""
        return f"{self.prefix}{name}"


@dataclass
class DemoResults:
    """What the run produced, read back from Kafka, the collector and the worker."""

    published: int = 0
    counters: dict[str, Any] = field(default_factory=dict)
    exported_window_count: int = 0
    exported_points: int = 0
    exported_log_records: int = 0
    summaries: list[WindowSummary] = field(default_factory=list)
    anomalies: list[AnomalyScore] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # Per device, its series scored offline (see _score_offline).
    offline: dict[str, list[SeriesPlot]] = field(default_factory=dict)
    elapsed_s: dict[str, float] = field(default_factory=dict)

    @property
    def dead_lettered_readings(self) -> int:
        """Dead letters that stand for one reading each (not export failures)."""
        return sum(1 for letter in self.dead_letters if letter.stage != "export")

    @property
    def balanced(self) -> bool:
        """True when every published reading is in a window or dead-lettered."""
        accounted = self.exported_window_count + self.dead_lettered_readings
        return accounted == self.published


def run_demo(
    settings: Settings, options: DemoOptions, *, say: Callable[[str], None]
) -> DemoResults:
    """Run the demo end to end and print its summary through ``say``.

    Args:
        settings: brokers, stack and detector settings (flags and environment).
        options: what to replay and where to write.
        say: receives the lines meant for the terminal user.

    Returns:
        The results; the summary has been printed and the PNGs written.

    Raises:
        DemoError: a process did not start, processing or export did not finish
            within ``options.timeout_s`` (naming what), or the accounting does not
            add up (after printing the summary).
        streams.stack.StackError: a stack server could not be started.
    """
    from streams.stack import LocalStack

    clock_started = time.monotonic()
    settings = settings.model_copy(update={"collector": True})
    stack = LocalStack(settings, say=say)
    started_servers: list[str] = []
    if options.manage_stack:
        started_servers = stack.up()
        if (
            options.collector_output is None
            and not settings.otlp_endpoint
            and stack.is_external("collector")
        ):
            # That collector writes what it receives to a file of its own stack,
            # out of this demo's sight: run one of ours on a free port instead.
            settings = settings.model_copy(update={"collector_port": _free_port()})
            stack = LocalStack(settings, say=say)
            say(
                "starting a collector of this demo on"
                f" 127.0.0.1:{settings.collector_port}"
            )
            stack.start_server("collector")
            started_servers.append("collector")
    collector_output = options.collector_output or stack.collector_output
    run = DemoRun(run_id=_run_id(), web_port=_free_port())
    say(f"demo run {run.run_id}: topics {run.prefix}*, web port {run.web_port}")
    try:
        results = _run_pipeline(settings, options, run, collector_output, say)
    finally:
        for name in started_servers:
            say(f"stopping {name}, started by this demo")
            stack.stop_server(name)
    results.elapsed_s["total"] = time.monotonic() - clock_started

    report = _report(results, options)
    for line in report:
        say(line)
    _write_summary(options.out_dir / "summary.json", results)
    if not results.balanced:
        raise DemoError(
            "accounting does not add up: exported window counts"
            f" {results.exported_window_count} + dead-lettered readings"
            f" {results.dead_lettered_readings} != published {results.published}"
        )
    return results


# -- one run ----------------------------------------------------------------------


def _run_pipeline(
    settings: Settings,
    options: DemoOptions,
    run: DemoRun,
    collector_output: Path,
    say: Callable[[str], None],
) -> DemoResults:
    from streams.replay import replay_files

    results = DemoResults()
    endpoint = settings.otlp_endpoint or f"http://127.0.0.1:{settings.collector_port}"
    log_dir = options.out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    state_dir = Path(tempfile.mkdtemp(prefix="edge-otlp-demo-"))
    env = _process_env(settings, run, endpoint, state_dir)
    collector = CollectorReader(collector_output, instance_suffix=run.worker_id)
    paths = [NAB_DIR / "data" / name for name in options.files]
    replay_settings = settings.model_copy(
        update={"mqtt_topic_pattern": run.mqtt_topic_pattern}
    )

    try:
        with _process("bridge", env, log_dir) as bridge:
            _wait_for_log(bridge, "bridge", log_dir, "MQTT connected")
            with _process("worker", env, log_dir) as worker:
                _wait_for_health(worker, run.web_port)
                say(f"bridge and worker ready; replaying {len(paths)} NAB files")
                step = time.monotonic()
                try:
                    results.published = replay_files(
                        paths,
                        settings=replay_settings,
                        speed=0.0,
                        limit=options.rows,
                        progress=sys.stderr.isatty(),
                    )
                except OSError as exc:
                    raise DemoError(
                        f"replay could not publish to MQTT at {settings.mqtt_url}:"
                        f" {exc}"
                    ) from exc
                results.elapsed_s["replay"] = time.monotonic() - step
                say(f"published {results.published} readings; waiting for export")

                step = time.monotonic()
                results.counters = asyncio.run(
                    _wait_until_exported(
                        settings, run, results.published, collector, options
                    )
                )
                results.elapsed_s["drain"] = time.monotonic() - step
        results.exported_window_count = collector.window_count
        results.exported_points = collector.points
        results.exported_log_records = collector.log_records
        asyncio.run(_read_outputs(settings, run, results))
    finally:
        # Also after a failure: the prefix is unique, so nothing would reuse them;
        # the processes' logs stay in the output folder.
        if not options.keep_topics:
            asyncio.run(_delete_own_topics(settings, run))
        shutil.rmtree(state_dir, ignore_errors=True)
    step = time.monotonic()
    results.offline = _score_offline(settings, options)
    _draw(options, results, say)
    results.elapsed_s["charts"] = time.monotonic() - step
    return results


def _process_env(
    settings: Settings, run: DemoRun, endpoint: str, state_dir: Path
) -> dict[str, str]:
    rules_file = settings.rules_file or PROJECT_ROOT / "rules" / "demo.yaml"
    return {
        **os.environ,
        **DEMO_ENV,
        "EDGE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "EDGE_MQTT_URL": settings.mqtt_url,
        "EDGE_TOPIC_PREFIX": run.prefix,
        "EDGE_MQTT_TOPIC_PATTERN": run.mqtt_topic_pattern,
        "EDGE_MQTT_CLIENT_ID": f"demo-{run.run_id}",
        "EDGE_WORKER_ID": run.worker_id,
        "EDGE_WEB_PORT": str(run.web_port),
        "EDGE_DATA_DIR": str(state_dir),
        "EDGE_RULES_FILE": str(rules_file),
        "EDGE_OTLP_ENDPOINT": endpoint,
        "EDGE_DETECTOR": settings.detector,
        "PYTHONUNBUFFERED": "1",
    }


@contextmanager
def _process(
    command: str, env: dict[str, str], log_dir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m streams <command>``; SIGTERM, then SIGKILL, on the way out."""
    with (log_dir / f"{command}.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "streams", command],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        _stop(process, command)


def _stop(process: subprocess.Popen[bytes], name: str) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        logger.warning("%s did not stop within %.0f s, killing it", name, STOP_GRACE_S)
        process.kill()
        process.wait(timeout=10)


def _wait_for_log(
    process: subprocess.Popen[bytes], name: str, log_dir: Path, text: str
) -> None:
    log = log_dir / f"{name}.log"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        _check_alive(process, name)
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise DemoError(
        f"{name} did not log {text!r} within {READY_TIMEOUT_S:.0f} s; see {log}"
    )


def _wait_for_health(process: subprocess.Popen[bytes], web_port: int) -> None:
    url = f"http://127.0.0.1:{web_port}/health"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        _check_alive(process, "worker")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise DemoError(f"worker not ready at {url} within {READY_TIMEOUT_S:.0f} s")


def _check_alive(process: subprocess.Popen[bytes], name: str) -> None:
    code = process.poll()
    if code is not None:
        raise DemoError(
            f"{name} exited with code {code} during the demo; see its log in"
            " the demo's logs folder"
        )


# -- waiting for the end ----------------------------------------------------------


class CollectorReader:
    """Read the collector's OTLP/JSON lines written since this reader was made.

    Only resources whose ``service.instance.id`` ends with ``instance_suffix`` are
    counted. Tumbling windows' ``count`` fields are summed; hopping windows carry
    ``edge.window.kind`` and are left out so a reading is counted once.
    """

    def __init__(self, path: Path, *, instance_suffix: str) -> None:
        """Start reading at the file's current end (or at 0 if it is missing)."""
        self.path = path
        self.suffix = instance_suffix
        self.offset = path.stat().st_size if path.exists() else 0
        self.window_count = 0
        self.points = 0
        self.log_records = 0
        self._partial = b""

    def poll(self) -> int:
        """Read what was appended since the last call; return its size in bytes."""
        if not self.path.exists():
            return 0
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        self.offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self._count(orjson.loads(line))
        return len(chunk)

    def _count(self, request: dict[str, Any]) -> None:
        for resource in request.get("resourceMetrics", ()):
            if not self._ours(resource):
                continue
            for scope in resource.get("scopeMetrics", ()):
                for metric in scope.get("metrics", ()):
                    points = metric.get("summary", {}).get("dataPoints", ())
                    for point in points:
                        self.points += 1
                        if not point.get("attributes"):
                            self.window_count += int(point.get("count", 0))
        for resource in request.get("resourceLogs", ()):
            if self._ours(resource):
                for scope in resource.get("scopeLogs", ()):
                    self.log_records += len(scope.get("logRecords", ()))

    def _ours(self, resource: dict[str, Any]) -> bool:
        for attribute in resource.get("resource", {}).get("attributes", ()):
            if attribute.get("key") == "service.instance.id":
                text = attribute.get("value", {}).get("stringValue", "")
                return bool(text.endswith(self.suffix))
        return False


async def _wait_until_exported(
    settings: Settings,
    run: DemoRun,
    published: int,
    collector: CollectorReader,
    options: DemoOptions,
) -> dict[str, Any]:
    """Poll until processed and exported; return the worker's last counters.

    Done means: the worker read every published message and has no open window,
    the exporter's consumer group has committed every output record, and the
    collector's file has stopped growing.
    """
    url = f"http://127.0.0.1:{run.web_port}/counters"
    deadline = time.monotonic() + options.timeout_s
    quiet_since = time.monotonic()
    status: dict[str, str] = {}
    counters: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            try:
                counters = (await client.get(url)).json()
            except (httpx.HTTPError, ValueError):
                status = {"worker": f"/counters at {url} does not answer"}
                continue
            lag = await _export_lag(settings, run)
            if collector.poll():
                quiet_since = time.monotonic()
            status = _unfinished(counters, published, lag, quiet_since)
            if not status:
                return counters
    problems = "; ".join(f"{name}: {text}" for name, text in status.items())
    raise DemoError(
        f"processing and export did not finish within {options.timeout_s:.0f} s"
        f" (--timeout-s): {problems}"
    )


def _unfinished(
    counters: dict[str, Any], published: int, lag: dict[str, int], quiet_since: float
) -> dict[str, str]:
    status = {}
    raw = int(counters.get("raw_messages", 0))
    if raw < published:
        status["worker"] = f"read {raw} of {published} published readings"
    open_devices = int(counters.get("open_devices", 0))
    if open_devices:
        status["windows"] = f"{open_devices} devices still have open windows"
    if any(lag.values()):
        status["export"] = f"exporter lag by topic {lag}"
    service_lag = counters.get("export", {}).get("lag_by_topic", {})
    if any(service_lag.values()):
        status["export counters"] = f"lag_by_topic {service_lag}"
    quiet_s = time.monotonic() - quiet_since
    if quiet_s < COLLECTOR_QUIET_S:
        status["collector"] = f"file still growing {quiet_s:.1f} s ago"
    return status


async def _export_lag(settings: Settings, run: DemoRun) -> dict[str, int]:
    """Records of each exported topic not yet committed by the exporter."""
    from streams.export import GROUP_ID

    topics = [run.topic(name) for name in SOURCE_TOPICS]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    try:
        await admin.start()
        await consumer.start()
        committed = await admin.list_consumer_group_offsets(f"{run.prefix}{GROUP_ID}")
        tps = await _partitions(consumer, topics)
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
        await admin.close()
    lag: dict[str, int] = dict.fromkeys(topics, 0)
    for tp, end in ends.items():
        meta = committed.get(tp)
        done = meta.offset if meta is not None and meta.offset >= 0 else 0
        lag[tp.topic] += max(0, end - done)
    return lag


async def _partitions(
    consumer: AIOKafkaConsumer, topics: list[str]
) -> list[TopicPartition]:
    await consumer._client.force_metadata_update()  # noqa: SLF001 - fresh topics
    return [
        TopicPartition(topic, partition)
        for topic in topics
        for partition in sorted(consumer.partitions_for_topic(topic) or ())
    ]


# -- reading back -----------------------------------------------------------------


async def _read_outputs(settings: Settings, run: DemoRun, results: DemoResults) -> None:
    """Read this run's output topics from the beginning to their current end."""
    names = ("window-summaries", "anomalies", "decisions", "dead-letters")
    decoders: dict[str, Callable[[bytes], Any]] = {
        run.topic("window-summaries"): WindowSummary.from_json,
        run.topic("anomalies"): AnomalyScore.from_json,
        run.topic("decisions"): Decision.from_json,
        run.topic("dead-letters"): DeadLetter.from_json,
    }
    targets: dict[str, list[Any]] = {
        run.topic("window-summaries"): results.summaries,
        run.topic("anomalies"): results.anomalies,
        run.topic("decisions"): results.decisions,
        run.topic("dead-letters"): results.dead_letters,
    }
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = await _partitions(consumer, [run.topic(n) for n in names])
        ends = await consumer.end_offsets(tps)
        remaining = {tp for tp, end in ends.items() if end > 0}
        consumer.assign(list(remaining))
        await consumer.seek_to_beginning(*remaining)
        while remaining:
            batch = await consumer.getmany(timeout_ms=1000)
            for tp, messages in batch.items():
                for message in messages:
                    if message.value is not None:
                        decoded = decoders[tp.topic](message.value)
                        targets[tp.topic].append(decoded)
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    results.decisions.sort(key=lambda d: (d.time_ms, d.device_id))


async def _delete_own_topics(settings: Settings, run: DemoRun) -> None:
    """Delete the Kafka topics whose names carry this run's unique prefix."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    try:
        await admin.start()
        ours = [t for t in await admin.list_topics() if t.startswith(run.prefix)]
        if ours:
            await admin.delete_topics(ours)
    except Exception:  # noqa: BLE001 - cleanup only; the results are complete
        logger.warning("could not delete the demo's topics prefix=%s", run.prefix)
    finally:
        await admin.close()


# -- summary ----------------------------------------------------------------------


def _report(results: DemoResults, options: DemoOptions) -> list[str]:
    c = results.counters
    lines = [
        "",
        "== edge-otlp demo summary ==",
        f"readings in (published over MQTT)   {results.published}",
        f"readings counted by the worker      {c.get('readings', 0)}"
        f" (duplicates {c.get('duplicates', 0)}, late {c.get('late', 0)},"
        f" rejected {c.get('rejected', 0)})",
        f"windows out (summaries)             {c.get('summaries', 0)}"
        f" ({c.get('idle_closes', 0)} closed by the idle timeout)",
        f"anomalies                           {c.get('anomalies', 0)}",
        f"decisions                           {c.get('decisions', 0)}"
        f" ({c.get('suppressed', 0)} suppressed by cooldowns)",
    ]
    by_rule = Counter(d.rule_id for d in results.decisions)
    lines += [f"  {rule_id:<24} {n}" for rule_id, n in sorted(by_rule.items())]
    lines.append("  examples:")
    for decision in _examples(results.decisions):
        lines.append(
            f"    {decision.rule_id:<22} device={decision.device_id:<36}"
            f" time={_iso(decision.time_ms)} action={decision.action}"
        )

    lines.append(f"dead-lettered                       {len(results.dead_letters)}")
    reasons = Counter(_reason_group(letter) for letter in results.dead_letters)
    lines += [f"  {n:>6}  {reason}" for reason, n in reasons.most_common()]

    accounted = results.exported_window_count + results.dead_lettered_readings
    verdict = "OK" if results.balanced else "MISMATCH"
    lines += [
        "accounting: readings counted in the windows the collector received"
        f" {results.exported_window_count}"
        f" + dead-lettered readings {results.dead_lettered_readings}"
        f" = {accounted}; published {results.published}: {verdict}",
        f"OTLP exported to the collector: {results.exported_points} summary points,"
        f" {results.exported_log_records} log records",
    ]
    lines += _codec_lines(results)
    lines += _device_lines(results)
    elapsed = results.elapsed_s
    lines.append(
        f"time: {elapsed.get('total', 0):.1f} s in all, replay"
        f" {elapsed.get('replay', 0):.1f} s, processing and export after the replay"
        f" {elapsed.get('drain', 0):.1f} s, scoring offline and charts"
        f" {elapsed.get('charts', 0):.1f} s"
    )
    lines.append(f"charts and summary.json in {options.out_dir}")
    return lines


def _examples(decisions: list[Decision]) -> list[Decision]:
    """Return up to five decisions in time order, each rule's first ones preferred.

    The first decision of each rule is picked before a repeat of any rule, so the
    examples show as many rules as there are; the picks are then ordered by event
    time (then device), whatever order ``decisions`` came in.
    """
    in_time = sorted(decisions, key=lambda d: (d.time_ms, d.device_id))
    seen: set[str] = set()
    firsts = []
    for decision in in_time:
        if decision.rule_id not in seen:
            seen.add(decision.rule_id)
            firsts.append(decision)
    rest = [d for d in in_time if d not in firsts]
    chosen = (firsts + rest)[:5]
    return sorted(chosen, key=lambda d: (d.time_ms, d.device_id))


def _reason_group(letter: DeadLetter) -> str:
    # Times and offsets differ per letter; the reason's shape is what groups them.
    shape = re.sub(r"\d+", "#", letter.reason)
    return f"[{letter.stage}] {shape}"[:140]


def _codec_lines(results: DemoResults) -> list[str]:
    sink = results.counters.get("export", {}).get("sink", {})
    lines = []
    sent_points = sink.get("points_by_codec", {})
    sent_bytes = sink.get("bytes_by_codec", {})
    for codec, points in sorted(sent_points.items()):
        size = int(sent_bytes.get(codec, 0))
        lines.append(
            f"sent by the exporter ({codec}): {points} points and records,"
            f" {size} bytes, {size / max(points, 1):.1f} bytes each"
        )
    lines.append("the same data re-encoded per codec (bytes per point or record):")
    sizes = encoded_sizes(results)
    items = len(results.summaries) + len(results.anomalies) + len(results.decisions)
    for codec, size in sizes.items():
        ratio = size / max(sizes["none"], 1)
        lines.append(
            f"  {codec:<5} {size:>10} bytes  {size / max(items, 1):7.1f}"
            f"  ({ratio:.2f} of plain protobuf)"
        )
    return lines


def encoded_sizes(results: DemoResults, *, batch_points: int = 5000) -> dict[str, int]:
    """Bytes the run's summaries, anomalies and decisions take per codec.

    They are encoded in batches of ``batch_points`` as the exporter does by
    default, serialized as OTLP protobuf and compressed with each codec.
    """
    info = ResourceInfo(service_instance_id="demo", site="site-1")
    bodies = []
    for at in range(0, len(results.summaries), batch_points):
        chunk = results.summaries[at : at + batch_points]
        bodies.append(encode_metrics(chunk, resource_info=info).SerializeToString())
    logs: list[AnomalyScore | Decision] = [*results.anomalies, *results.decisions]
    for at in range(0, len(logs), batch_points):
        chunk_logs = logs[at : at + batch_points]
        bodies.append(encode_logs(chunk_logs, resource_info=info).SerializeToString())
    return {
        codec: sum(len(compress(body, codec)) for body in bodies) for codec in CODECS
    }


def _device_lines(results: DemoResults) -> list[str]:
    lines = [
        "per device: decisions and anomalies inside NAB's labelled anomaly windows;"
        " anomalies as the worker published them and as score_csv finds them offline"
    ]
    for device_id, series in sorted(results.offline.items()):
        spans = [span for one in series for span in one.labelled_windows]
        decisions = [d for d in results.decisions if d.device_id == device_id]
        anomalies = [a for a in results.anomalies if a.device_id == device_id]
        offline = sum(
            1 for one in series for score in one.scores if score >= one.threshold
        )
        decided_inside = sum(1 for d in decisions if _inside(d.time_ms, spans))
        flagged_inside = sum(1 for a in anomalies if _inside(a.time_ms, spans))
        lines.append(
            f"  {device_id:<38} decisions {decided_inside} of {len(decisions)} inside,"
            f" anomalies {flagged_inside} of {len(anomalies)} inside"
            f" (offline {offline}), {len(spans)} labelled windows"
        )
    return lines


def _inside(time_ms: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= time_ms <= end for start, end in spans)


def _write_summary(path: Path, results: DemoResults) -> None:
    summary = {
        "published": results.published,
        "exported_window_count": results.exported_window_count,
        "dead_lettered_readings": results.dead_lettered_readings,
        "balanced": results.balanced,
        "exported_points": results.exported_points,
        "exported_log_records": results.exported_log_records,
        "decisions": len(results.decisions),
        "anomalies": len(results.anomalies),
        "counters": results.counters,
        "elapsed_s": results.elapsed_s,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))


# -- charts -----------------------------------------------------------------------


def _score_offline(
    settings: Settings, options: DemoOptions
) -> dict[str, list[SeriesPlot]]:
    """Score every replayed file with the worker's detector, grouped by device.

    The worker publishes only the scores at or above the threshold; the charts
    need the whole curve. :func:`streams.scorecsv.score_csv` runs the worker's
    code path (a fresh detector per series, score then learn, in file order), so
    the curve is the worker's as long as no reading was late or a duplicate.
    """
    from streams.replay import device_for, metric_for
    from streams.scorecsv import read_series_file, score_csv

    # The worker's own choice of detector and threshold (streams.app).
    spec = DetectorSpec(settings.detector)
    threshold = settings.anomaly_threshold or DEFAULT_THRESHOLD
    labels = parse_windows((NAB_DIR / "labels" / "combined_windows.json").read_text())
    by_device: dict[str, list[SeriesPlot]] = {}
    for name in options.files:
        path = NAB_DIR / "data" / name
        rows = read_series_file(path)[: options.rows]
        scores = [score for _, _, score in score_csv(path, spec)][: len(rows)]
        by_device.setdefault(device_for(path), []).append(
            SeriesPlot(
                metric=metric_for(path),
                source=name,
                times_ms=[row.time_ms for row in rows],
                values=[row.value for row in rows],
                scores=scores,
                threshold=threshold,
                detector=spec.name,
                labelled_windows=labels.get(name, []),
            )
        )
    return by_device


def _draw(
    options: DemoOptions, results: DemoResults, say: Callable[[str], None]
) -> None:
    from streams.plots import plot_device

    for device_id, series in results.offline.items():
        detector = series[0].detector
        note = (
            "anomaly score: streams.scorecsv.score_csv offline, the worker's"
            f" detector code path ({detector}, threshold {series[0].threshold});"
            " vertical lines: decisions from Kafka"
        )
        decisions = [d for d in results.decisions if d.device_id == device_id]
        png = options.out_dir / f"{device_id}.png"
        plot_device(
            png, device_id=device_id, series=series, decisions=decisions,
            score_note=note,
        )  # fmt: skip
        say(f"wrote {png}")


# -- small parts ------------------------------------------------------------------


def _run_id() -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _iso(time_ms: int) -> str:
    return datetime.fromtimestamp(time_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")


__all__ = [
    "FULL_FILES",
    "QUICK_FILES",
    "QUICK_ROWS",
    "CollectorReader",
    "DemoError",
    "DemoOptions",
    "DemoResults",
    "encoded_sizes",
    "run_demo",
]
