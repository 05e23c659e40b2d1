"""Long-running processes (bridge, worker) wired from :class:`Settings`.

Each ``run_*`` function builds the connectors from settings, runs them until
SIGINT or SIGTERM, then stops them cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from connectors.kafka_topics import PIPELINE_TOPICS, ensure_topics
from connectors.mqtt import Bridge
from streams.config import Settings

logger = logging.getLogger(__name__)


def run_worker(settings: Settings) -> None:
    """Run the Faust worker (all agents, web server, exporter) until stopped."""
    import faust

    from streams.app import create_app

    names = [settings.topic(n) for n in PIPELINE_TOPICS]
    # Faust creates its changelog and assignor topics itself, but a consumer group
    # assigned before they are visible keeps no partitions: create them first.
    internal = [
        f"{settings.topic_prefix}edge-otlp-worker-{name}"
        for name in ("devices-changelog", "__assignor-__leader")
    ]
    asyncio.run(
        ensure_topics(
            settings.kafka_bootstrap,
            names + internal,
            partitions=settings.partitions,
            compacted=frozenset(internal[:1]),
        )
    )
    asyncio.set_event_loop(asyncio.new_event_loop())
    app = create_app(settings)
    worker = faust.Worker(app, loglevel="INFO", redirect_stdouts=False)
    worker.execute_from_commandline()


def run_bridge(settings: Settings) -> None:
    """Run the MQTT -> Kafka bridge until SIGINT or SIGTERM."""
    asyncio.run(_run_bridge(settings))


async def _run_bridge(settings: Settings) -> None:
    await ensure_topics(
        settings.kafka_bootstrap,
        [settings.topic(name) for name in PIPELINE_TOPICS],
        partitions=settings.partitions,
    )
    bridge = Bridge(
        mqtt_host=settings.mqtt_host,
        mqtt_port=settings.mqtt_port_from_url,
        client_id=settings.mqtt_client_id,
        topic_pattern=settings.mqtt_topic_pattern,
        kafka_bootstrap=settings.kafka_bootstrap,
        raw_topic=settings.topic("telemetry-raw"),
        dead_letter_topic=settings.topic("dead-letters"),
        max_payload_bytes=settings.bridge_max_payload_bytes,
        max_inflight=settings.bridge_max_inflight,
        session_expiry_s=settings.mqtt_session_expiry_s,
        summary_interval_s=settings.log_summary_interval_s,
        idle_timeout_s=settings.idle_timeout_s,
        idle_tick_horizon_s=settings.idle_tick_horizon_s,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with bridge:
        await stop.wait()
