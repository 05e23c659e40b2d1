"""The ``edge-otlp`` console script: every process entry point of the project.

Every setting comes from its ``EDGE_*`` environment variable, else its default; the
few settings that have a flag take the flag first, and each such flag's help names
its variable. Logging is configured here and nowhere else.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from streams.config import ConfigError, PipelineError, Settings, load_settings

logger = logging.getLogger(__name__)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One line per HTTP request is noise at INFO; the exporter logs what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _settings(ctx: click.Context, /, **flags: Any) -> Settings:
    try:
        return load_settings(**ctx.obj.get("flags", {}), **flags)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
@click.option(
    "--kafka-bootstrap",
    help="Kafka bootstrap servers, host:port[,host:port] [env EDGE_KAFKA_BOOTSTRAP]",
)
@click.option(
    "--mqtt-url", help="MQTT broker URL, mqtt://host:port [env EDGE_MQTT_URL]"
)
@click.option(
    "--topic-prefix",
    help="prefix of every Kafka topic and consumer group [env EDGE_TOPIC_PREFIX]",
)
@click.option(
    "--log-level", default="INFO", show_default=True, envvar="EDGE_LOG_LEVEL",
    help="DEBUG, INFO, WARNING or ERROR [env EDGE_LOG_LEVEL]",
)  # fmt: skip
@click.pass_context
def main(
    ctx: click.Context,
    kafka_bootstrap: str | None,
    mqtt_url: str | None,
    topic_prefix: str | None,
    log_level: str,
) -> None:
    """edge-otlp: MQTT -> Kafka -> Faust -> OTLP telemetry pipeline for the edge."""
    _configure_logging(log_level)
    ctx.ensure_object(dict)
    ctx.obj["flags"] = {
        "kafka_bootstrap": kafka_bootstrap,
        "mqtt_url": mqtt_url,
        "topic_prefix": topic_prefix,
    }


# -- stack ------------------------------------------------------------------------


@main.group()
def stack() -> None:
    """Local Kafka, Mosquitto and OpenTelemetry Collector on 127.0.0.1."""


def _stack_options(func: Any) -> Any:
    options = [
        click.option("--stack-dir", type=click.Path(path_type=Path),
                     help="cache, data and logs [env EDGE_STACK_DIR]"),
        click.option("--kafka-port", type=int,
                     help="Kafka port [env EDGE_KAFKA_PORT]"),
        click.option("--kafka-controller-port", type=int,
                     help="KRaft controller port [env EDGE_KAFKA_CONTROLLER_PORT]"),
        click.option("--mqtt-port", type=int,
                     help="Mosquitto port [env EDGE_MQTT_PORT]"),
        click.option("--collector-port", type=int,
                     help="collector OTLP/HTTP port [env EDGE_COLLECTOR_PORT]"),
        click.option("--collector/--no-collector", default=None,
                     help="also the OpenTelemetry Collector [env EDGE_COLLECTOR]"),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


@stack.command("up")
@_stack_options
@click.pass_context
def stack_up(ctx: click.Context, /, **flags: Any) -> None:
    """Install what is missing, start the servers, wait until each answers."""
    from streams.stack import LocalStack

    settings = _settings(ctx, **flags)
    try:
        LocalStack(settings, say=click.echo).up()
    except PipelineError as exc:
        raise click.ClickException(str(exc)) from exc


@stack.command("down")
@_stack_options
@click.pass_context
def stack_down(ctx: click.Context, /, **flags: Any) -> None:
    """Stop the servers this stack started, by pid."""
    from streams.stack import LocalStack

    LocalStack(_settings(ctx, **flags), say=click.echo).down()


@stack.command("status")
@_stack_options
@click.pass_context
def stack_status(ctx: click.Context, /, **flags: Any) -> None:
    """Say which server runs where; exit 1 when one is stopped."""
    from streams.stack import main_status

    sys.exit(main_status(_settings(ctx, **flags)))


# -- bridge -----------------------------------------------------------------------


@main.command("bridge")
@click.option(
    "--mqtt-topic-pattern",
    help="MQTT topics to subscribe to, with {device_id} [env EDGE_MQTT_TOPIC_PATTERN]",
)
@click.option(
    "--mqtt-client-id",
    help="MQTT client id, naming the persistent session [env EDGE_MQTT_CLIENT_ID]",
)
@click.option(
    "--bridge-max-inflight",
    type=int,
    help="MQTT messages not yet acknowledged by Kafka [env EDGE_BRIDGE_MAX_INFLIGHT]",
)
@click.option(
    "--bridge-max-payload-bytes",
    type=int,
    help="larger payloads are dead-lettered [env EDGE_BRIDGE_MAX_PAYLOAD_BYTES]",
)
@click.pass_context
def bridge(ctx: click.Context, /, **flags: Any) -> None:
    """Move MQTT telemetry into Kafka's telemetry-raw topic (QoS 1, no loss)."""
    from streams.processes import run_bridge

    settings = _settings(ctx, **flags)
    logger.info("effective configuration %s", settings.redacted())
    run_bridge(settings)


# -- worker -----------------------------------------------------------------------


@main.command("worker")
@click.option(
    "--worker-id",
    help="this worker's name, suffix of its data folder [env EDGE_WORKER_ID]",
)
@click.option("--web-port", type=int, help="web server port [env EDGE_WEB_PORT]")
@click.option(
    "--rules-file",
    type=click.Path(path_type=Path, exists=True),
    help="rule file (YAML) [env EDGE_RULES_FILE]",
)
@click.option(
    "--window-size-s",
    type=float,
    help="tumbling window size in seconds [env EDGE_WINDOW_SIZE_S]",
)
@click.pass_context
def worker(ctx: click.Context, /, **flags: Any) -> None:
    """Run the Faust worker: readings, windows, anomalies, decisions, export."""
    from streams.processes import run_worker

    settings = _settings(ctx, **flags)
    logger.info("effective configuration %s", settings.redacted())
    try:
        run_worker(settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


# -- replay -----------------------------------------------------------------------


@main.command("replay")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--speed",
    type=float,
    default=0.0,
    show_default=True,
    help="event-time speed-up factor; 0 publishes as fast as possible",
)
@click.option("--device-id", help="device id (one file only); default: file name")
@click.option("--metric", help="metric name; default: guessed from the file name")
@click.option("--limit", type=int, help="publish at most N rows per file")
@click.option("--progress/--no-progress", default=True, help="show a progress bar")
@click.pass_context
def replay(
    ctx: click.Context,
    files: tuple[str, ...],
    speed: float,
    device_id: str | None,
    metric: str | None,
    limit: int | None,
    progress: bool,
) -> None:
    """Publish timestamp,value CSV series over MQTT with QoS 1, one device per file."""
    from streams.replay import replay_files

    settings = _settings(ctx)
    if device_id and len(files) > 1:
        raise click.UsageError("--device-id needs exactly one FILE")
    count = replay_files(
        [Path(f) for f in files],
        settings=settings,
        speed=speed,
        device_id=device_id,
        metric=metric,
        limit=limit,
        progress=progress,
    )
    click.echo(f"published {count} readings")


# -- rules ------------------------------------------------------------------------


@main.group()
def rules() -> None:
    """Rule files: the conditions that turn readings into decisions."""


@rules.command("check")
@click.argument("file", type=click.Path(path_type=Path))
def rules_check(file: Path) -> None:
    """Validate a rule file; print each problem with its line and field."""
    from models.rules import check_rules, load_rules

    problems = check_rules(file)
    for problem in problems:
        click.echo(str(problem), err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{len(load_rules(file))} rules OK")


# -- export -----------------------------------------------------------------------


@main.command("export")
@click.option("--otlp-endpoint", help="OTLP/HTTP base URL [env EDGE_OTLP_ENDPOINT]")
@click.option(
    "--otlp-compression",
    type=click.Choice(["gzip", "zstd", "lz4", "none"]),
    help="request compression [env EDGE_OTLP_COMPRESSION]",
)
@click.option(
    "--otlp-output-dir",
    type=click.Path(path_type=Path),
    help="OTLP/JSON folder without an endpoint [env EDGE_OTLP_OUTPUT_DIR]",
)
@click.option(
    "--unreachable-max-backoff-s",
    type=float,
    default=60.0,
    show_default=True,
    help="retry delay cap while the endpoint is unreachable",
)
@click.pass_context
def export(
    ctx: click.Context, /, unreachable_max_backoff_s: float, **flags: Any
) -> None:
    """Export window summaries, anomalies and decisions as OTLP, then commit."""
    import asyncio

    from streams.export import run_export_service

    settings = _settings(ctx, **flags)
    logger.info("effective config %s", settings.redacted())
    try:
        asyncio.run(
            run_export_service(
                settings, unreachable_max_backoff_s=unreachable_max_backoff_s
            )
        )
    except KeyboardInterrupt:
        pass
    except PipelineError as exc:
        raise click.ClickException(str(exc)) from exc


# -- score-csv --------------------------------------------------------------------


@main.command("score-csv")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--detector", "detector_name", default="surprise", show_default=True,
    help="registered detector name (surprise, gaussian)",
)  # fmt: skip
def score_csv_command(file: Path, detector_name: str) -> None:
    """Print timestamp,value,anomaly_score for each row of a timestamp,value CSV."""
    from models.csvseries import InvalidSeries
    from models.detectors import DETECTORS, DetectorSpec
    from streams.scorecsv import score_csv

    if detector_name not in DETECTORS:
        names = ", ".join(sorted(DETECTORS))
        message = f"--detector must be one of {names} (got {detector_name!r})"
        raise click.BadParameter(message)
    try:
        rows = list(score_csv(file, DetectorSpec(name=detector_name)))
    except InvalidSeries as exc:
        raise click.ClickException(f"{file}: {exc}") from exc

    click.echo("timestamp,value,anomaly_score")
    for timestamp_text, value_text, score in rows:
        click.echo(f"{timestamp_text},{value_text},{score!r}")


# -- demo -------------------------------------------------------------------------


@main.command("demo")
@click.option(
    "--quick",
    is_flag=True,
    help="replay the first rows of two NAB files only (about 20 s once set up)",
)
@click.option(
    "--rows",
    type=int,
    help="replay at most N rows per file (default: all; 600 with --quick)",
)
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path),
    default=Path("out/demo"),
    show_default=True,
    help="PNG charts, summary.json and process logs",
)
@click.option(
    "--timeout-s",
    type=float,
    help="bound on processing and export after the replay"
    " (default 480; 90 with --quick)",
)
@click.option(
    "--stack/--no-stack",
    "manage_stack",
    default=True,
    show_default=True,
    help="start the local stack's missing servers, stop them afterwards",
)
@click.option(
    "--collector-output",
    type=click.Path(path_type=Path),
    help="the collector's OTLP/JSON file (default: the local stack's)",
)
@click.option("--keep-topics", is_flag=True, help="keep this run's Kafka topics")
@click.pass_context
def demo(
    ctx: click.Context,
    quick: bool,
    rows: int | None,
    out_dir: Path,
    timeout_s: float | None,
    manage_stack: bool,
    collector_output: Path | None,
    keep_topics: bool,
) -> None:
    """Replay NAB series through MQTT, Kafka, the worker and OTLP; account for all."""
    from streams.demo import (
        FULL_FILES,
        QUICK_FILES,
        QUICK_ROWS,
        DemoOptions,
        run_demo,
    )

    options = DemoOptions(
        files=QUICK_FILES if quick else FULL_FILES,
        rows=rows or (QUICK_ROWS if quick else None),
        out_dir=out_dir,
        timeout_s=timeout_s or (90.0 if quick else 480.0),
        manage_stack=manage_stack,
        collector_output=collector_output,
        keep_topics=keep_topics,
    )
    # One line per poll of the worker's web views would bury the summary.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        run_demo(_settings(ctx), options, say=click.echo)
    except PipelineError as exc:
        raise click.ClickException(str(exc)) from exc


# -- bench ------------------------------------------------------------------------


@main.command("bench")
@click.argument(
    "names",
    nargs=-1,
    type=click.Choice(["all", "bridge", "worker", "latency", "state", "nab", "export"]),
)
@click.option("--quick", is_flag=True, help="short smoke run; its figures mean little")
@click.option(
    "--out-dir", type=click.Path(path_type=Path), default=Path("bench-results"),
    show_default=True, help="where results.jsonl and latest.md go",
)  # fmt: skip
def bench(names: tuple[str, ...], quick: bool, out_dir: Path) -> None:
    """Run benchmarks (default: all) and print one table of figures.

    Live benches (bridge, worker, latency) use the brokers of EDGE_KAFKA_BOOTSTRAP
    and EDGE_MQTT_URL with topics and client ids of their own.
    """
    from streams.bench.runner import format_table, run_benches, write_results

    chosen = names or ("all",)

    def done(name: str, figures: list[Any]) -> None:
        click.echo(f"bench {name}: {len(figures)} figures", err=True)

    figures = run_benches(chosen, quick=quick, on_done=done)
    command = "edge-otlp bench " + " ".join(chosen) + (" --quick" if quick else "")
    jsonl, latest = write_results(
        figures, out_dir=out_dir, quick=quick, command=command
    )
    click.echo(format_table(figures), nl=False)
    click.echo(f"appended to {jsonl}; table in {latest}", err=True)
