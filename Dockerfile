# The edge-otlp image: one image for every process (bridge, worker, export, ...).
# Build: docker build -t edge-otlp:local .   Run: docker compose up -d

# -- build stage: resolve the locked dependencies into /app/.venv ---------------------
FROM python:3.11-slim AS build

# uv is pinned to the version the Makefile installs, so the image resolves uv.lock
# exactly as development machines do.
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /app

# Dependencies first: this layer is rebuilt only when the lock file changes.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project

# The project is installed editable on purpose: streams/config.py finds the rules/
# and config/ folders next to the packages, so the sources stay in /app.
COPY README.md ./
COPY models/ models/
COPY connectors/ connectors/
COPY streams/ streams/
COPY rules/ rules/
COPY config/ config/
RUN uv sync --frozen --no-dev

# -- runtime stage: the virtual environment and the sources, no uv, no pip cache -------
FROM python:3.11-slim

# A fixed uid, so a bind-mounted data folder can be given to it on the host.
RUN useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /app edge \
    && mkdir -p /var/lib/edge-otlp \
    && chown edge:edge /var/lib/edge-otlp

WORKDIR /app
COPY --from=build /app /app

# Defaults for a container; compose and `docker run -e` override them. The web
# server binds all interfaces so a published port reaches it.
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    EDGE_WEB_HOST=0.0.0.0 \
    EDGE_WEB_PORT=6066 \
    EDGE_DATA_DIR=/var/lib/edge-otlp/worker \
    EDGE_OTLP_OUTPUT_DIR=/var/lib/edge-otlp/otlp

USER edge
EXPOSE 6066

# The worker's /health answers 200 only when Kafka is reachable and partitions are
# assigned; urlopen raises on 503, so the check fails then. Processes without a web
# server (bridge, export) disable this check in docker-compose.yml.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('EDGE_WEB_PORT', '6066'); urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4)"]

ENTRYPOINT ["edge-otlp"]
CMD ["worker"]
