"""Create the pipeline's Kafka topics before anything produces or consumes them.

Faust does not create an agent's source topic, and auto-created topics get the
broker's default partition count; so every process creates all pipeline topics
with the configured partition count before it starts. Existing topics are left as
they are (their partition count is reported if it differs).
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

logger = logging.getLogger(__name__)

# Topic base names; the full name is EDGE_TOPIC_PREFIX + base name.
PIPELINE_TOPICS = (
    "telemetry-raw",
    "readings",
    "window-summaries",
    "anomalies",
    "decisions",
    "dead-letters",
)


async def ensure_topics(
    bootstrap: str,
    names: list[str],
    *,
    partitions: int,
    replication_factor: int = 1,
    timeout_s: float = 60.0,
    compacted: frozenset[str] = frozenset(),
) -> None:
    """Create the topics in ``names`` that do not exist yet, and wait for them.

    Waits up to ``timeout_s`` for Kafka to answer, retrying every second, so a
    process started together with the broker does not fail; then waits until the
    broker's metadata lists every topic, because a consumer group that is assigned
    before its topics are visible stays without partitions. Topics in
    ``compacted`` are created with ``cleanup.policy=compact`` (table changelogs).

    Raises:
        KafkaConnectionError: Kafka did not answer within ``timeout_s``.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [n for n in names if n not in existing]
            if missing:
                await _create(admin, missing, partitions, replication_factor, compacted)
                await _wait_visible(admin, missing, deadline)
            return
        except KafkaConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            logger.warning("Kafka not reachable yet, retrying bootstrap=%s", bootstrap)
            await asyncio.sleep(1.0)
        finally:
            await admin.close()


async def _wait_visible(
    admin: AIOKafkaAdminClient, names: list[str], deadline: float
) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        described = await admin.describe_topics(names)
        ready = [
            d for d in described if d.get("error_code") == 0 and d.get("partitions")
        ]
        if len(ready) == len(names):
            return
        await asyncio.sleep(0.2)
    logger.warning("topics not visible in metadata in time topics=%s", names)


async def _create(
    admin: AIOKafkaAdminClient,
    names: list[str],
    partitions: int,
    replication: int,
    compacted: frozenset[str],
) -> None:
    new = [
        NewTopic(
            n,
            partitions,
            replication,
            topic_configs={"cleanup.policy": "compact"} if n in compacted else {},
        )
        for n in names
    ]
    try:
        await admin.create_topics(new)
    except TopicAlreadyExistsError:
        # Another process created some of them first; that is fine.
        pass
    logger.info("created topics=%s partitions=%d", ",".join(names), partitions)
