"""Static checks of the site deployment: docker-compose.yml, Dockerfile, configs.

No Docker engine runs on development machines or in CI, so these tests are what
keeps the compose stack true to the code: images, health checks, volumes, the
EDGE_* variables it sets, and the Mosquitto settings shared with the local stack.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from streams.cli import main as cli_main
from streams.collector import COLLECTOR_RELEASE
from streams.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MOSQUITTO_TEMPLATE = ROOT / "config" / "mosquitto.conf"
MOSQUITTO_COMPOSE = ROOT / "config" / "mosquitto-compose.conf"
COLLECTOR_COMPOSE = ROOT / "config" / "collector-compose.yaml"
MAKEFILE = ROOT / "Makefile"

EDGE_VARIABLE = re.compile(r"\bEDGE_[A-Z0-9_]+\b")
# Settings where compose and the local stack may differ: where to listen, where
# to keep data, and which user to switch to (the image decides that).
MOSQUITTO_SITE_SPECIFIC = {"listener", "persistence_location", "user"}


def settings_variables() -> set[str]:
    """Return the environment variable of every Settings field."""
    return {f"EDGE_{name.upper()}" for name in Settings.model_fields}


def cli_variables() -> set[str]:
    """Return the EDGE_* variables the CLI reads itself (click ``envvar``)."""
    found: set[str] = set()
    pending: list[click.Command] = [cli_main]
    while pending:
        command = pending.pop()
        for param in command.params:
            envvars = param.envvar
            if isinstance(envvars, str):
                envvars = [envvars]
            found.update(v for v in envvars or () if v.startswith("EDGE_"))
        if isinstance(command, click.Group):
            pending.extend(command.commands.values())
    return found


def known_edge_variables() -> set[str]:
    """Return every EDGE_* variable edge-otlp reads: Settings fields and CLI ones."""
    return settings_variables() | cli_variables()


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def service(name: str) -> dict[str, Any]:
    return load_compose()["services"][name]


def environment(svc: dict[str, Any]) -> dict[str, str]:
    """Return a service's environment as a dict, from either compose form."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def command_text(svc: dict[str, Any]) -> str:
    parts = []
    for key in ("entrypoint", "command"):
        value = svc.get(key) or []
        parts.extend([value] if isinstance(value, str) else value)
    return " ".join(parts)


def healthcheck_text(svc: dict[str, Any]) -> str:
    test = svc.get("healthcheck", {}).get("test", [])
    return test if isinstance(test, str) else " ".join(test)


def volume_targets(svc: dict[str, Any]) -> dict[str, str]:
    """Map each mount's container path to its source (named volume or host path)."""
    targets = {}
    for mount in svc.get("volumes", []):
        if isinstance(mount, dict):
            targets[mount["target"]] = mount["source"]
        else:
            source, target = mount.split(":")[:2]
            targets[target] = source
    return targets


def parse_mosquitto(text: str) -> dict[str, list[str]]:
    """Return Mosquitto options by name; an option may appear on several lines."""
    options: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        options.setdefault(name, []).append(value.strip())
    return options


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, continuation lines joined."""
    logical: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    pairs = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def dockerfile_arguments(instruction: str) -> list[str]:
    return [args for name, args in dockerfile_instructions() if name == instruction]


def dockerfile_final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


# -- services and images -------------------------------------------------------------


def test_compose_defines_every_site_service() -> None:
    services = set(load_compose()["services"])

    assert {"kafka", "mosquitto", "bridge", "worker", "otel-collector"} <= services


def test_compose_kafka_image_is_the_version_the_local_stack_runs() -> None:
    image = service("kafka")["image"]

    assert re.fullmatch(r"apache/kafka:4\.0\.\d+", image)
    assert image.split(":")[1] == Settings.model_fields["kafka_version"].default


def test_compose_mosquitto_image_is_mosquitto_2() -> None:
    assert re.fullmatch(r"eclipse-mosquitto:2(\.\d+)*", service("mosquitto")["image"])


def test_compose_collector_image_is_pinned_to_the_local_stack_release() -> None:
    image = service("otel-collector")["image"]

    assert re.fullmatch(r"otel/opentelemetry-collector-contrib:\d+\.\d+\.\d+", image)
    assert image.split(":")[1] == COLLECTOR_RELEASE.lstrip("v")


def test_compose_bridge_and_worker_run_the_project_image() -> None:
    bridge, worker = service("bridge"), service("worker")

    assert bridge["image"] == worker["image"]
    assert bridge["build"]["context"] == "."
    assert bridge["command"] == ["bridge"]
    assert command_text(worker).endswith("exec edge-otlp worker")


# -- kafka ------------------------------------------------------------------------


def test_compose_kafka_runs_kraft_combined_mode_with_single_replicas() -> None:
    env = environment(service("kafka"))

    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert "CONTROLLER://:9093" in env["KAFKA_LISTENERS"].split(",")
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    factors = [v for k, v in env.items() if k.endswith("REPLICATION_FACTOR")]
    assert factors
    assert set(factors) == {"1"}


def test_compose_kafka_advertises_the_address_the_pipeline_uses() -> None:
    kafka_env = environment(service("kafka"))
    advertised = kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")

    for name in ("bridge", "worker"):
        bootstrap = environment(service(name))["EDGE_KAFKA_BOOTSTRAP"]
        assert f"PLAINTEXT://{bootstrap}" in advertised


def test_compose_kafka_keeps_its_log_dirs_on_a_named_volume() -> None:
    kafka = service("kafka")
    log_dir = environment(kafka)["KAFKA_LOG_DIRS"]

    assert volume_targets(kafka)[log_dir] in load_compose()["volumes"]


def test_compose_topic_partitions_agree_between_kafka_and_pipeline() -> None:
    kafka_partitions = environment(service("kafka"))["KAFKA_NUM_PARTITIONS"]

    for name in ("bridge", "worker"):
        assert environment(service(name))["EDGE_PARTITIONS"] == kafka_partitions


# -- health checks and start order -------------------------------------------------


def test_compose_kafka_healthcheck_asks_the_broker() -> None:
    test = healthcheck_text(service("kafka"))

    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in test
    assert "--bootstrap-server" in test


def test_compose_mosquitto_healthcheck_subscribes_to_sys_topic() -> None:
    test = healthcheck_text(service("mosquitto"))

    assert test.startswith("CMD mosquitto_sub")
    assert "$$SYS/" in test
    assert "-W" in test


def test_compose_worker_healthcheck_requests_health_on_the_web_port() -> None:
    worker = service("worker")
    port = environment(worker)["EDGE_WEB_PORT"]

    assert f"http://127.0.0.1:{port}/health" in healthcheck_text(worker)
    assert "urllib" in healthcheck_text(worker)


def test_compose_bridge_disables_the_image_healthcheck_it_cannot_answer() -> None:
    assert service("bridge")["healthcheck"] == {"disable": True}


@pytest.mark.parametrize("name", ["bridge", "worker"])
def test_compose_pipeline_waits_for_healthy_brokers(name: str) -> None:
    depends_on = service(name)["depends_on"]

    for broker in ("kafka", "mosquitto"):
        assert depends_on[broker]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["kafka", "mosquitto", "bridge", "worker"])
def test_compose_long_running_service_restarts_unless_stopped(name: str) -> None:
    assert service(name)["restart"] == "unless-stopped"


# -- ports and volumes ---------------------------------------------------------------


def test_compose_worker_web_port_is_not_one_fixed_host_port() -> None:
    """A fixed host port would stop the second replica of `--scale worker=N`."""
    worker = service("worker")
    port = environment(worker)["EDGE_WEB_PORT"]

    for mapping in worker.get("ports", []):
        host, _, container = str(mapping).rpartition(":")
        assert container == port
        host_port = host.rpartition(":")[2]
        assert host_port == "" or "-" in host_port


def test_compose_worker_keeps_its_data_dir_on_a_named_volume() -> None:
    worker = service("worker")
    data_dir = Path(environment(worker)["EDGE_DATA_DIR"])
    targets = volume_targets(worker)

    mounted = [t for t in targets if data_dir.is_relative_to(t)]
    assert mounted
    assert targets[mounted[0]] in load_compose()["volumes"]


def test_compose_mosquitto_mounts_its_config_and_a_data_volume() -> None:
    targets = volume_targets(service("mosquitto"))

    config_source = targets["/mosquitto/config/mosquitto.conf"]
    assert (ROOT / config_source).resolve() == MOSQUITTO_COMPOSE
    assert targets["/mosquitto/data"] in load_compose()["volumes"]


def test_compose_collector_mounts_its_config_and_writes_to_a_volume() -> None:
    collector = service("otel-collector")
    targets = volume_targets(collector)
    config = yaml.safe_load(COLLECTOR_COMPOSE.read_text())

    assert (ROOT / targets["/etc/otelcol-contrib/config.yaml"]).resolve() == (
        COLLECTOR_COMPOSE
    )
    file_dir = str(Path(config["exporters"]["file"]["path"]).parent)
    assert targets[file_dir] in load_compose()["volumes"]


# -- EDGE_* variables ----------------------------------------------------------------


def compose_edge_variables() -> set[str]:
    found: set[str] = set()
    for svc in load_compose()["services"].values():
        found.update(environment(svc))
        found.update(EDGE_VARIABLE.findall(command_text(svc)))
    return {name for name in found if name.startswith("EDGE_")}


def test_compose_sets_only_edge_variables_that_settings_declares() -> None:
    """Settings ignores unknown EDGE_* names, so a typo would pass silently."""
    unknown = compose_edge_variables() - known_edge_variables()

    assert not unknown


def test_compose_interpolates_no_edge_variable_settings_lacks() -> None:
    text = COMPOSE_FILE.read_text()
    interpolated = set(re.findall(r"\$\{(EDGE_[A-Z0-9_]+)", text))

    assert not interpolated - known_edge_variables()


def test_dockerfile_sets_only_edge_variables_that_settings_declares() -> None:
    unknown = set(EDGE_VARIABLE.findall(DOCKERFILE.read_text())) - (
        known_edge_variables()
    )

    assert not unknown


@pytest.mark.parametrize("name", ["bridge", "worker"])
def test_compose_environment_is_valid_settings(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = environment(service(name))
    env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", v) for k, v in env.items()}
    for variable in settings_variables():
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)

    settings = Settings()

    assert settings.kafka_bootstrap == "kafka:9092"
    assert settings.mqtt_host == "mosquitto"


def test_compose_worker_exports_to_the_collector_service() -> None:
    endpoint = urlsplit(environment(service("worker"))["EDGE_OTLP_ENDPOINT"])
    config = yaml.safe_load(COLLECTOR_COMPOSE.read_text())
    receiver = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]

    assert endpoint.hostname == "otel-collector"
    assert receiver == f"0.0.0.0:{endpoint.port}"


def test_compose_mqtt_url_points_at_the_mosquitto_listener() -> None:
    listener = parse_mosquitto(MOSQUITTO_COMPOSE.read_text())["listener"]

    for name in ("bridge", "worker"):
        url = urlsplit(environment(service(name))["EDGE_MQTT_URL"])
        assert url.hostname == "mosquitto"
        assert [str(url.port)] == listener


# -- Mosquitto and collector configuration -------------------------------------------


def test_mosquitto_compose_config_carries_the_local_stack_settings() -> None:
    template = parse_mosquitto(MOSQUITTO_TEMPLATE.read_text())
    compose = parse_mosquitto(MOSQUITTO_COMPOSE.read_text())

    for name in MOSQUITTO_SITE_SPECIFIC:
        template.pop(name, None)
        compose.pop(name, None)
    assert compose == template


def test_mosquitto_compose_config_keeps_queued_messages_on_the_volume() -> None:
    compose = parse_mosquitto(MOSQUITTO_COMPOSE.read_text())

    assert compose["persistence"] == ["true"]
    assert compose["persistence_location"] == ["/mosquitto/data/"]
    assert int(compose["autosave_interval"][0]) > 0
    assert compose["max_queued_messages"] == ["10000000"]
    assert compose["max_inflight_messages"] == ["1000"]


def test_mosquitto_compose_config_listens_on_all_container_interfaces() -> None:
    compose = parse_mosquitto(MOSQUITTO_COMPOSE.read_text())

    assert compose["listener"] == ["1883"]
    assert "user" not in compose


def test_collector_compose_config_sends_metrics_and_logs_to_debug_and_file() -> None:
    config = yaml.safe_load(COLLECTOR_COMPOSE.read_text())
    pipelines = config["service"]["pipelines"]

    assert {"debug", "file"} <= set(config["exporters"])
    for signal in ("metrics", "logs"):
        assert pipelines[signal]["receivers"] == ["otlp"]
        assert set(pipelines[signal]["exporters"]) == {"debug", "file"}


# -- Dockerfile ------------------------------------------------------------------


def test_dockerfile_builds_on_python_311_slim() -> None:
    images = [args.split()[0] for args in dockerfile_arguments("FROM")]

    assert images
    assert set(images) == {"python:3.11-slim"}


def test_dockerfile_installs_the_lock_file_exactly_without_dev_tools() -> None:
    syncs = [run for run in dockerfile_arguments("RUN") if "uv sync" in run]

    assert syncs
    assert all("--frozen" in run and "--no-dev" in run for run in syncs)


def test_dockerfile_pins_the_uv_version_of_the_makefile() -> None:
    makefile_version = re.search(r"^UV_VERSION := (\S+)$", MAKEFILE.read_text(), re.M)
    dockerfile_version = re.search(r"ARG UV_VERSION=(\S+)", DOCKERFILE.read_text())

    assert makefile_version and dockerfile_version
    assert dockerfile_version.group(1) == makefile_version.group(1)


def test_dockerfile_copies_every_folder_the_processes_need() -> None:
    copied = " ".join(dockerfile_arguments("COPY"))

    for folder in ("models/", "connectors/", "streams/", "rules/", "config/"):
        assert folder in copied


def test_dockerfile_runs_edge_otlp_worker_as_a_non_root_user() -> None:
    final = dict(dockerfile_final_stage())

    assert final["ENTRYPOINT"] == '["edge-otlp"]'
    assert final["CMD"] == '["worker"]'
    assert final["USER"] not in ("root", "0")
    assert "6066" in final["EXPOSE"].split()


def test_dockerfile_healthcheck_requests_health_with_urllib() -> None:
    final = dict(dockerfile_final_stage())

    assert "urllib.request" in final["HEALTHCHECK"]
    assert "/health" in final["HEALTHCHECK"]


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    lines = DOCKERIGNORE.read_text().splitlines()

    assert "*" in lines
    for needed in ("pyproject.toml", "uv.lock", "README.md", "streams/"):
        assert f"!{needed}" in lines
    assert not any(line.startswith("!.") for line in lines)
