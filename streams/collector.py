"""Build and configure the OpenTelemetry Collector of the local stack.

The collector stands in for the cloud in end-to-end tests: it receives OTLP/HTTP on
loopback and appends every request it accepts to a file as OTLP/JSON, one request
per line, so a test can check exactly what arrived.

It is built once with the official OpenTelemetry Collector Builder from the Go
module proxy and cached under the stack folder; every Go cache (modules, build
objects, the builder itself) lives there too, so a fresh clone fills only its own
ignored folder. This module does not start the collector; :mod:`streams.stack`
does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from streams.config import PipelineError

# One collector release for every module: the builder, the core receiver and
# exporter and the contrib file exporter. v0.161.0 is the newest release whose
# contrib file exporter the Go module proxy here serves with all it needs.
COLLECTOR_RELEASE = "v0.161.0"
BUILDER_MODULE = "go.opentelemetry.io/collector/cmd/builder"
DIST_NAME = "otelcol-edge"

# The OTLP/HTTP receiver must take the exporter's largest uncompressed batch.
MAX_REQUEST_BODY_BYTES = 20 * 1024 * 1024

# A cold build compiles the collector's dependency tree; on two cores that can
# take a quarter of an hour, so the bound is generous but still a bound.
BUILD_TIMEOUT_S = 40 * 60.0


class CollectorBuildError(PipelineError):
    """The collector could not be built (Go missing, proxy refused, build failed)."""


def builder_config(output_dir: Path) -> str:
    """Return the builder's manifest for the stack's collector distribution.

    Args:
        output_dir: folder the builder writes the sources and the binary to.

    Returns:
        YAML text for ``builder --config``.
    """
    release = COLLECTOR_RELEASE
    core = "go.opentelemetry.io/collector"
    contrib = "github.com/open-telemetry/opentelemetry-collector-contrib"
    return (
        "dist:\n"
        f"  name: {DIST_NAME}\n"
        "  description: edge-otlp local stack collector (OTLP in, file and debug out)\n"
        f"  output_path: {output_dir}\n"
        "receivers:\n"
        f"  - gomod: {core}/receiver/otlpreceiver {release}\n"
        "exporters:\n"
        f"  - gomod: {core}/exporter/debugexporter {release}\n"
        f"  - gomod: {contrib}/exporter/fileexporter {release}\n"
    )


def ensure_collector_binary(stack_dir: Path, *, say: Callable[[str], None]) -> Path:
    """Return the collector binary, building it first when it is not cached.

    The builder is installed with ``go install`` into ``<stack_dir>/collector/bin``
    and run there; Go's module and build caches go to ``<stack_dir>/go``. A binary
    already present is returned as is, without a check that it is current: delete
    ``<stack_dir>/collector`` to rebuild.

    Args:
        stack_dir: the local stack's folder (absolute or relative to the cwd).
        say: receives one line of progress for a terminal user.

    Returns:
        Path of the executable collector.

    Raises:
        CollectorBuildError: when Go is not installed or a build step fails; the
            message names the step and the log file holding its output.
    """
    root = stack_dir.resolve() / "collector"
    dist_dir = root / f"dist-{COLLECTOR_RELEASE}"
    binary = dist_dir / DIST_NAME
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary

    go = shutil.which("go") or next(
        (p for p in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go") if Path(p).exists()),
        None,
    )
    if go is None:
        raise CollectorBuildError(
            "`go` is not installed; the collector is built with the OpenTelemetry"
            " Collector Builder and needs Go 1.24 or newer (for example the Debian"
            " package `golang`), or start the stack with --no-collector"
        )

    bin_dir = root / "bin"
    gocache = stack_dir.resolve() / "go"
    for folder in (bin_dir, dist_dir, gocache):
        folder.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "GOBIN": str(bin_dir),
        "GOPATH": str(gocache / "path"),
        "GOMODCACHE": str(gocache / "mod"),
        "GOCACHE": str(gocache / "build"),
        # Never fetch another Go toolchain: use the one installed.
        "GOTOOLCHAIN": "local",
        "PATH": f"{Path(go).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = root / "build.log"

    builder = bin_dir / "builder"
    if not builder.is_file():
        say(f"installing the collector builder {COLLECTOR_RELEASE} (once)")
        _run([go, "install", f"{BUILDER_MODULE}@{COLLECTOR_RELEASE}"], env, log)

    manifest = root / "builder.yaml"
    manifest.write_text(builder_config(dist_dir))
    say(f"building the collector {COLLECTOR_RELEASE} (once; minutes on a cold cache)")
    _run([str(builder), "--config", str(manifest)], env, log)
    if not binary.is_file():
        raise CollectorBuildError(
            f"the builder finished but {binary} is missing; see {log}"
        )
    return binary


def _run(argv: list[str], env: dict[str, str], log: Path) -> None:
    step = " ".join(Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv))
    with log.open("ab") as out:
        out.write(f"\n$ {step}\n".encode())
        out.flush()
        try:
            result = subprocess.run(
                argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            message = f"`{step}` took over {BUILD_TIMEOUT_S:.0f} s; see {log}"
            raise CollectorBuildError(message) from exc
    if result.returncode != 0:
        raise CollectorBuildError(
            f"`{step}` failed with exit code {result.returncode}; see {log}"
        )


def collector_config(port: int, output_file: Path) -> str:
    """Return the collector's YAML configuration for the local stack.

    OTLP/HTTP only, on ``127.0.0.1:port`` (no gRPC listener, so nothing else
    binds); metrics and logs both go to the file exporter (OTLP/JSON, one request
    per line, appended, flushed every 100 ms, never rotated) and to the debug
    exporter at basic verbosity. The collector's own telemetry is off so it opens
    no further port.

    Args:
        port: loopback port of the OTLP/HTTP receiver.
        output_file: file the received requests are appended to.

    Returns:
        YAML text for ``--config``.
    """
    path = str(output_file.resolve())
    pipeline = "{ receivers: [otlp], exporters: [file, debug] }"
    return (
        "receivers:\n"
        "  otlp:\n"
        "    protocols:\n"
        "      http:\n"
        f"        endpoint: 127.0.0.1:{port}\n"
        f"        max_request_body_size: {MAX_REQUEST_BODY_BYTES}\n"
        "exporters:\n"
        "  file:\n"
        f"    path: {_yaml_quote(path)}\n"
        "    format: json\n"
        "    append: true\n"
        # Smallest practical flush period: tests read the file right after a 2xx.
        "    flush_interval: 100ms\n"
        "  debug:\n"
        "    verbosity: basic\n"
        "service:\n"
        "  telemetry:\n"
        "    metrics:\n"
        "      level: none\n"
        "  pipelines:\n"
        f"    metrics: {pipeline}\n"
        f"    logs: {pipeline}\n"
    )


def _yaml_quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


__all__ = [
    "COLLECTOR_RELEASE",
    "CollectorBuildError",
    "builder_config",
    "collector_config",
    "ensure_collector_binary",
]
