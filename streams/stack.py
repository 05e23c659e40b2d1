"""The local stack: real Kafka, Mosquitto and an OpenTelemetry Collector on loopback.

Development machines and CI have no Docker engine, so ``edge-otlp stack up`` starts
the same servers the site's ``docker-compose.yml`` runs, as plain processes bound to
127.0.0.1:

* Apache Kafka (KRaft, combined broker and controller) from the jars on Maven
  Central, resolved once with Maven into ``<stack_dir>/kafka-<version>/lib``;
  storage is formatted on the first start.
* Mosquitto from Debian's package, with the project's ``config/mosquitto.conf``
  (persistence on, deep queues for offline persistent sessions).
* The OpenTelemetry Collector built with the official builder (see
  :mod:`streams.collector`), writing what it receives to a file.

Every server is started detached, its pid written to ``<stack_dir>/run/NAME.pid``
and its output to ``<stack_dir>/logs/NAME.log``. ``up`` is idempotent: a server
whose pid is alive and whose port answers is left alone. ``down`` stops only the
processes whose pids it wrote. Nothing here is used by the pipeline itself.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from streams.config import ConfigError, PipelineError, Settings

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO_CONF_TEMPLATE = PROJECT_ROOT / "config" / "mosquitto.conf"

# Maven's log4j2 binding for SLF4J 1.7, the API version Kafka 4.0 depends on.
LOG4J_VERSION = "2.24.3"
READY_TIMEOUT_S = 90.0


class StackError(PipelineError):
    """A local-stack server could not be installed, started or reached."""


@dataclass(frozen=True)
class Server:
    """One server of the local stack: how to start it and how to see it is up."""

    name: str
    port: int
    argv: list[str]
    env: dict[str, str] | None = None


class LocalStack:
    """Start, stop and inspect the local stack described by ``settings``."""

    def __init__(self, settings: Settings, *, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.say = say
        self.root = settings.stack_dir.resolve()
        self.run_dir = self.root / "run"
        self.log_dir = self.root / "logs"
        self.data_dir = self.root / "data"

    # -- public commands -----------------------------------------------------------

    def up(self) -> list[str]:
        """Install what is missing, start what is not running, wait until ready.

        A server already answering on its port but not started by this stack
        (another checkout's, or the user's own) is used as it is: nothing is
        installed or started for it, and ``down`` leaves it alone.

        Returns:
            The names of the servers this call started.
        """
        for folder in (self.run_dir, self.log_dir, self.data_dir):
            folder.mkdir(parents=True, exist_ok=True)
        started = []
        for name in self.wanted:
            if self._pid(name) is not None:
                self.say(f"{name:<10} already running")
            elif self.is_external(name):
                self.say(
                    f"{name:<10} already answering on 127.0.0.1:{self.port(name)}"
                    " (not started by this stack; used as it is, left alone)"
                )
            else:
                self._start(self._server(name))
                started.append(name)
        for name in self.wanted:
            self._wait_ready(name)
            self.say(f"{name:<10} ready on 127.0.0.1:{self.port(name)}")
        return started

    @property
    def wanted(self) -> list[str]:
        """The servers of this stack, in start order."""
        return ["kafka", "mosquitto"] + (
            ["collector"] if self.settings.collector else []
        )

    def port(self, name: str) -> int:
        """Return the loopback port of server ``name``."""
        s = self.settings
        return {
            "kafka": s.kafka_port,
            "mosquitto": s.mqtt_port,
            "collector": s.collector_port,
        }[name]

    def is_external(self, name: str) -> bool:
        """Return True when a working ``name`` answers that this stack did not start."""
        return self._pid(name) is None and self._answers(name)

    def down(self) -> None:
        """Stop the servers this stack started (by their pid files), then wait."""
        if all(self._pid(name) is None for name in ("collector", "mosquitto", "kafka")):
            self.say("nothing started by this stack is running")
        for name in ("collector", "mosquitto", "kafka"):
            pid = self._pid(name)
            if pid is None:
                continue
            self.say(f"stopping {name} (pid {pid})")
            _terminate(pid, grace_s=30.0)
            (self.run_dir / f"{name}.pid").unlink(missing_ok=True)

    def status(self) -> dict[str, str]:
        """Return one line per server: started here, answering, or stopped."""
        lines = {}
        for name in ("kafka", "mosquitto", "collector"):
            port = self.port(name)
            pid = self._pid(name)
            if pid is not None:
                answering = "answering" if _port_open(port) else "not answering"
                lines[name] = f"pid {pid}, 127.0.0.1:{port} {answering}"
            elif self._answers(name):
                lines[name] = f"127.0.0.1:{port} answering (not started by this stack)"
            else:
                lines[name] = "stopped"
        return lines

    def stop_server(self, name: str) -> None:
        """Stop one server (tests use this to cut a broker mid-stream)."""
        pid = self._pid(name)
        if pid is not None:
            _terminate(pid, grace_s=30.0)
            (self.run_dir / f"{name}.pid").unlink(missing_ok=True)

    def start_server(self, name: str) -> None:
        """Start one server again and wait until it answers."""
        self._start(self._server(name))
        self._wait_ready(name)

    @property
    def collector_output(self) -> Path:
        """File the collector appends every received request to, as OTLP/JSON."""
        return self.data_dir / "collector" / "received.jsonl"

    # -- servers ----------------------------------------------------------------

    def _server(self, name: str) -> Server:
        """Install what server ``name`` needs and describe how it starts."""
        return {
            "kafka": self._kafka,
            "mosquitto": self._mosquitto,
            "collector": self._collector,
        }[name]()

    def _answers(self, name: str) -> bool:
        port = self.port(name)
        if not _port_open(port):
            return False
        check = {
            "kafka": _kafka_answers,
            "mosquitto": _mqtt_answers,
            "collector": _http_answers,
        }[name]
        return check(port)

    def _kafka(self) -> Server:
        s = self.settings
        lib = self._kafka_jars()
        data = self.data_dir / "kafka"
        config = self.root / "kafka.properties"
        config.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{s.kafka_controller_port}",
                    f"listeners=PLAINTEXT://127.0.0.1:{s.kafka_port},"
                    f"CONTROLLER://127.0.0.1:{s.kafka_controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{s.kafka_port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,"
                    "CONTROLLER:PLAINTEXT",
                    f"log.dirs={data}",
                    f"num.partitions={s.partitions}",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=8",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=true",
                    # Room for a payload at the bridge's 1 MiB limit plus headers.
                    "message.max.bytes=2097152",
                    # A site box is small: keep the broker's own threads modest.
                    "num.network.threads=2",
                    "num.io.threads=4",
                    "",
                ]
            )
        )
        log4j = self.root / "log4j2.xml"
        log4j.write_text(
            '<Configuration status="WARN"><Appenders>'
            '<Console name="out" target="SYSTEM_OUT">'
            '<PatternLayout pattern="[%d] %p %m (%c)%n"/></Console></Appenders>'
            '<Loggers><Logger name="kafka" level="INFO"/>'
            '<Logger name="org.apache.kafka" level="WARN"/>'
            '<Root level="WARN"><AppenderRef ref="out"/></Root></Loggers>'
            "</Configuration>\n"
        )
        java = _require(
            "java", "install a JDK 17+, e.g. apt-get install openjdk-17-jre"
        )
        classpath = f"{lib}/*"
        jvm = [java, "-Xms256m", "-Xmx1g", f"-Dlog4j2.configurationFile={log4j}"]
        if not (data / "meta.properties").exists():
            data.mkdir(parents=True, exist_ok=True)
            cluster_id = _kraft_cluster_id()
            self.say(f"formatting Kafka storage in {data}")
            subprocess.run(
                [*jvm, "-cp", classpath, "kafka.tools.StorageTool", "format",
                 "-t", cluster_id, "-c", str(config)],
                check=True, capture_output=True,
            )  # fmt: skip
        return Server(
            name="kafka",
            port=s.kafka_port,
            argv=[*jvm, "-cp", classpath, "kafka.Kafka", str(config)],
        )

    def _kafka_jars(self) -> Path:
        version = self.settings.kafka_version
        home = self.root / f"kafka-{version}"
        lib = home / "lib"
        marker = home / ".resolved"
        if marker.exists():
            return lib
        mvn = _require("mvn", "install Maven, e.g. apt-get install maven")
        home.mkdir(parents=True, exist_ok=True)
        (home / "pom.xml").write_text(_kafka_pom(version))
        self.say(f"resolving Apache Kafka {version} jars with Maven (once)")
        result = subprocess.run(
            [mvn, "-B", "-q", "-f", str(home / "pom.xml"),
             "dependency:copy-dependencies", f"-DoutputDirectory={lib}",
             "-DincludeScope=runtime"],
            capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise StackError(
                f"Maven could not resolve org.apache.kafka:kafka_2.13:{version}:\n"
                + result.stdout[-2000:]
                + result.stderr[-2000:]
            )
        marker.touch()
        return lib

    def _mosquitto(self) -> Server:
        s = self.settings
        binary = shutil.which("mosquitto") or _first_existing(
            "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"
        )
        if binary is None:
            binary = _apt_install("mosquitto", "mosquitto-clients", say=self.say)
        data = self.data_dir / "mosquitto"
        data.mkdir(parents=True, exist_ok=True)
        template = MOSQUITTO_CONF_TEMPLATE.read_text()
        config = self.root / "mosquitto.conf"
        config.write_text(
            template.replace("{port}", str(s.mqtt_port))
            .replace("{persistence_dir}", f"{data}/")
            # Started as root, Mosquitto switches to this user; keep the one that
            # owns the data folder so persistence can be written.
            .replace("{user}", getpass.getuser())
        )
        return Server(
            name="mosquitto",
            port=s.mqtt_port,
            argv=[binary, "-c", str(config)],
        )

    def _collector(self) -> Server:
        from streams.collector import collector_config, ensure_collector_binary

        s = self.settings
        binary = ensure_collector_binary(self.root, say=self.say)
        out = self.collector_output
        out.parent.mkdir(parents=True, exist_ok=True)
        config = self.root / "collector.yaml"
        config.write_text(collector_config(port=s.collector_port, output_file=out))
        return Server(
            name="collector",
            port=s.collector_port,
            argv=[str(binary), "--config", str(config)],
        )

    # -- process handling ---------------------------------------------------------

    def _pid(self, name: str) -> int | None:
        pidfile = self.run_dir / f"{name}.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if not _alive(pid):
            pidfile.unlink(missing_ok=True)
            return None
        return pid

    def _start(self, server: Server) -> None:
        if self._pid(server.name) is not None:
            self.say(f"{server.name:<10} already running")
            return
        if _port_open(server.port):
            raise StackError(
                f"port 127.0.0.1:{server.port} is taken by a process that is not a"
                f" working {server.name}; stop it or choose another port"
            )
        with (self.log_dir / f"{server.name}.log").open("ab") as log:
            # Detached on purpose: the server outlives this command; `down` stops it
            # by the pid written below.
            process = subprocess.Popen(
                server.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(server.env or {})},
            )
        (self.run_dir / f"{server.name}.pid").write_text(str(process.pid))
        self.say(f"{server.name:<10} started (pid {process.pid})")

    def _wait_ready(self, name: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        log = self.log_dir / f"{name}.log"
        while time.monotonic() < deadline:
            if self._answers(name):
                return
            if self._pid(name) is None and not self._answers(name):
                raise StackError(f"{name} exited during start-up; see {log}")
            time.sleep(0.3)
        raise StackError(
            f"{name} did not answer on 127.0.0.1:{self.port(name)} within "
            f"{READY_TIMEOUT_S:.0f} s; see {log}"
        )


def _kafka_pom(version: str) -> str:
    deps = [
        ("org.apache.kafka", "kafka_2.13", version),
        ("org.apache.logging.log4j", "log4j-slf4j-impl", LOG4J_VERSION),
        ("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION),
    ]
    body = "".join(
        f"<dependency><groupId>{g}</groupId><artifactId>{a}</artifactId>"
        f"<version>{v}</version></dependency>"
        for g, a, v in deps
    )
    return (
        '<project xmlns="http://maven.apache.org/POM/4.0.0">'
        "<modelVersion>4.0.0</modelVersion><groupId>local.edge-otlp</groupId>"
        "<artifactId>kafka-runtime</artifactId><version>1</version>"
        f"<packaging>pom</packaging><dependencies>{body}</dependencies></project>\n"
    )


def _kraft_cluster_id() -> str:
    # KRaft wants a base64url-encoded 16-byte UUID without padding.
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _require(command: str, hint: str) -> str:
    path = shutil.which(command)
    if path is None:
        raise StackError(f"`{command}` is not installed; {hint}")
    return path


def _first_existing(*paths: str) -> str | None:
    return next((p for p in paths if Path(p).exists()), None)


def _apt_install(*packages: str, say: Callable[[str], None]) -> str:
    apt = shutil.which("apt-get")
    if apt is None:
        raise StackError(
            "Mosquitto is not installed and apt-get is missing; install the"
            " `mosquitto` package with your system's package manager"
        )
    if os.geteuid() != 0:
        raise StackError(
            "Mosquitto is not installed; run `sudo apt-get install mosquitto"
            " mosquitto-clients` (installing needs root)"
        )
    say(f"installing {' '.join(packages)} with apt-get (once)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([apt, "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(
        [apt, "install", "-y", "-qq", *packages],
        check=True,
        env=env,
        capture_output=True,
    )
    binary = shutil.which("mosquitto") or _first_existing("/usr/sbin/mosquitto")
    if binary is None:
        raise StackError("apt-get installed mosquitto but its binary was not found")
    return binary


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _terminate(pid: int, *, grace_s: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            _reap(pid)
            return
        time.sleep(0.1)
    logger.warning("process did not stop in time, killing pid=%s", pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _kafka_answers(port: int) -> bool:
    """True when the broker answers a metadata request and has a controller."""
    if not _port_open(port):
        return False
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=3000
        )
        try:
            await admin.start()
            await admin.list_topics()
            return True
        except (KafkaError, OSError):
            return False
        finally:
            await admin.close()

    return asyncio.run(probe())


def _mqtt_answers(port: int) -> bool:
    if not _port_open(port):
        return False
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="")
    try:
        client.connect("127.0.0.1", port, keepalive=5)
        client.disconnect()
        return True
    except OSError:
        return False


def _http_answers(port: int) -> bool:
    if not _port_open(port):
        return False
    import httpx

    try:
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/metrics",
            content=b"",
            headers={"content-type": "application/x-protobuf"},
            timeout=2.0,
        )
    except httpx.HTTPError:
        return False
    return response.status_code < 500


def main_status(settings: Settings) -> int:
    """Print the status of every server; exit code 0 when all run."""
    stack = LocalStack(settings, say=lambda line: None)
    lines = stack.status()
    for name, line in lines.items():
        sys.stdout.write(f"{name:<10} {line}\n")
    return 0 if all(lines[n] != "stopped" for n in stack.wanted) else 1


__all__ = ["ConfigError", "LocalStack", "StackError", "main_status"]
