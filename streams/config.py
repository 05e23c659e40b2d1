"""Settings: read the ``EDGE_*`` environment once, validate, freeze.

Every setting is declared once here, with its environment variable, its default and
what it means; ``docs/CONFIGURATION.md`` and the README table are checked against
this class by a test. Connectors and agents never read the environment: they get
plain arguments built from a :class:`Settings`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_RULES_DIR = PROJECT_ROOT / "rules"


class PipelineError(Exception):
    """Root of every error the pipeline raises on purpose."""


class ConfigError(PipelineError):
    """Invalid configuration; start-up stops with this message."""


Compression = Literal["gzip", "zstd", "lz4", "none"]


class Settings(BaseSettings):
    """Effective configuration of every edge-otlp process.

    Precedence: command-line flag, then ``EDGE_*`` environment variable, then the
    default below. Instances are frozen.
    """

    model_config = SettingsConfigDict(
        env_prefix="EDGE_", frozen=True, extra="ignore", env_ignore_empty=True
    )

    # --- brokers -------------------------------------------------------------
    kafka_bootstrap: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]"
    )
    mqtt_url: str = Field(
        "mqtt://127.0.0.1:1883", description="MQTT broker URL, mqtt://host:port"
    )
    topic_prefix: str = Field(
        "", description="prefix of every Kafka topic name (tests isolate runs with it)"
    )
    partitions: int = Field(
        4, ge=1, le=1024, description="partitions of the topics the project creates"
    )
    site: str = Field("site-1", description="site name carried in OTLP resources")

    # --- bridge ----------------------------------------------------------------
    mqtt_topic_pattern: str = Field(
        "devices/{device_id}/telemetry",
        description="MQTT topic pattern; {device_id} required, {site} optional",
    )
    mqtt_client_id: str = Field(
        "edge-otlp-bridge",
        description="stable MQTT client id of the bridge (persistent session)",
    )
    mqtt_session_expiry_s: int = Field(
        7 * 24 * 3600,
        ge=0,
        description="how long the broker keeps the bridge's session while offline",
    )
    bridge_max_payload_bytes: int = Field(
        1024 * 1024, ge=1, description="larger MQTT payloads are dead-lettered"
    )
    bridge_max_inflight: int = Field(
        1000,
        ge=1,
        le=65535,
        description="MQTT messages received but not yet acknowledged by Kafka",
    )
    log_summary_interval_s: float = Field(
        30.0, gt=0, description="period of the INFO summary line of counters"
    )

    # --- worker: readings and windows -------------------------------------------
    window_size_s: float = Field(60.0, gt=0, description="tumbling window size")
    hopping_window_size_s: float = Field(
        0.0, ge=0, description="hopping window size; 0 disables hopping windows"
    )
    hopping_window_step_s: float = Field(
        0.0, ge=0, description="hopping window step (advance)"
    )
    allowed_lateness_s: float = Field(
        10.0, ge=0, description="how far behind the watermark a reading may arrive"
    )
    idle_timeout_s: float = Field(
        30.0,
        gt=0,
        description="wall-clock seconds without readings after which a series'"
        " windows close, as EDGE_IDLE_CLOSE says",
    )
    idle_close: Literal["clock", "all"] = Field(
        "clock",
        description="which windows an idle series closes: clock = those whose end"
        " plus the lateness has passed on the device's clock (a device that pauses"
        " loses nothing); all = every open window (replays of history)",
    )
    max_clock_skew_s: float = Field(
        300.0, ge=0, description="readings further ahead of now are rejected"
    )
    rules_file: Path | None = Field(
        None, description="rules YAML file; unset: the bundled industrial pack"
    )
    detector: str = Field(
        "surprise", description="detector of every metric (surprise|gaussian)"
    )
    detectors_by_metric: str = Field(
        "", description="per-metric detectors, metric=name[,metric=name]"
    )
    anomaly_threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="anomaly score from which a reading goes to anomalies;"
        " unset: the detector's recommended threshold",
    )
    anomaly_thresholds_by_metric: str = Field(
        "", description="per-metric thresholds, metric=0.7[,metric=0.8]"
    )
    publish_readings: bool = Field(
        True, description="also produce every normalized reading to `readings`"
    )
    max_series_per_device: int = Field(
        64,
        ge=1,
        le=1000,
        description="metrics one device may have; readings of more are dead-lettered"
        " (bounds the device's state record)",
    )
    kafka_linger_ms: int = Field(
        20,
        ge=0,
        le=1000,
        description="the worker's Kafka producer waits this long to batch readings,"
        " window summaries, anomalies and dead letters (decisions and MQTT commands"
        " are sent at once)",
    )
    kafka_session_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a worker silent this long loses its partitions to the others",
    )
    web_host: str = Field("127.0.0.1", description="bind address of the web server")
    web_port: int = Field(6066, ge=1, le=65535, description="Faust web server port")
    data_dir: Path = Field(
        Path(".stack/worker"), description="worker's local table state folder"
    )
    worker_id: str = Field("", description="suffix of the worker's data folder")

    # --- exporter ----------------------------------------------------------------
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP base URL, e.g. http://127.0.0.1:4318; unset: write"
        " OTLP/JSON files to EDGE_OTLP_OUTPUT_DIR",
    )
    otlp_compression: Compression = Field("gzip", description="gzip|zstd|lz4|none")
    otlp_headers: SecretStr = Field(
        SecretStr(""),
        description="extra HTTP headers, k=v,k=v (an auth token; never logged)",
    )
    otlp_ca_file: Path | None = Field(None, description="CA bundle for TLS")
    otlp_timeout_s: float = Field(10.0, gt=0, description="HTTP timeout per request")
    otlp_output_dir: Path = Field(
        Path("out/otlp"), description="where OTLP/JSON files go without an endpoint"
    )
    export_max_batch_points: int = Field(
        5000, ge=1, description="data points and log records per export batch"
    )
    export_max_batch_age_s: float = Field(
        1.0, gt=0, description="oldest item's age at which a batch is sent"
    )
    export_enabled: bool = Field(True, description="run the exporter in the worker")

    # --- local stack (development and tests) --------------------------------------
    stack_dir: Path = Field(
        Path(".stack"), description="cache, data and logs of the local stack"
    )
    kafka_version: str = Field("4.0.2", description="Apache Kafka version to run")
    kafka_port: int = Field(9092, ge=1, le=65535, description="local Kafka port")
    kafka_controller_port: int = Field(
        9093, ge=1, le=65535, description="local KRaft controller port"
    )
    mqtt_port: int = Field(1883, ge=1, le=65535, description="local Mosquitto port")
    collector_port: int = Field(
        4318, ge=1, le=65535, description="local collector OTLP/HTTP port"
    )
    collector: bool = Field(True, description="start the OpenTelemetry Collector")

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise ValueError(f"must look like mqtt://127.0.0.1:1883, got {value!r}")
        return value

    @field_validator("mqtt_topic_pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        if "{device_id}" not in value:
            raise ValueError(
                "must contain {device_id}, e.g. devices/{device_id}/telemetry"
            )
        return value

    @property
    def mqtt_host(self) -> str:
        """Host name of the MQTT broker."""
        return urlsplit(self.mqtt_url).hostname or "127.0.0.1"

    @property
    def mqtt_port_from_url(self) -> int:
        """Port of the MQTT broker (1883 when the URL has none)."""
        return urlsplit(self.mqtt_url).port or 1883

    @property
    def idle_tick_horizon_s(self) -> float:
        """Return how long after a device's last record a window of it may be open.

        The longest window plus the allowed lateness: the bridge sends idle
        ticks for a quiet device until then, so that windows closing on the
        device's clock (EDGE_IDLE_CLOSE=clock) come out.
        """
        longest_s = max(self.window_size_s, self.hopping_window_size_s)
        return longest_s + self.allowed_lateness_s

    def topic(self, name: str) -> str:
        """Return the full Kafka topic name of a pipeline topic."""
        return f"{self.topic_prefix}{name}"

    def otlp_header_map(self) -> dict[str, str]:
        """Parse ``EDGE_OTLP_HEADERS`` (``k=v,k=v``) into a dict."""
        raw = self.otlp_headers.get_secret_value()
        headers: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in raw.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(
                    "EDGE_OTLP_HEADERS must be k=v pairs separated by commas,"
                    " e.g. authorization=Bearer%20abc"
                )
            headers[key.strip()] = value.strip()
        return headers

    def metric_map(self, name: str) -> dict[str, str]:
        """Parse a ``metric=value,metric=value`` setting such as detectors_by_metric.

        Raises:
            ConfigError: naming the variable, when an item has no ``=``.
        """
        raw = getattr(self, name)
        result: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in raw.split(","))):
            metric, sep, value = item.partition("=")
            if not sep or not metric.strip() or not value.strip():
                raise ConfigError(
                    f"EDGE_{name.upper()} must be metric=value pairs separated by"
                    f" commas, e.g. temperature=0.7, got {item!r}"
                )
            result[metric.strip()] = value.strip()
        return result

    def redacted(self) -> dict[str, object]:
        """Return the settings as a dict safe to log (secrets stay redacted)."""
        return {k: str(v) for k, v in self.model_dump().items()}


def load_settings(**overrides: object) -> Settings:
    """Build the settings from flags (``overrides``), environment and defaults.

    Raises:
        ConfigError: naming the variable that is invalid and why.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            problems.append(f"EDGE_{field.upper()}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from exc
