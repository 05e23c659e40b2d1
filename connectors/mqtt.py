"""The MQTT -> Kafka bridge: move device payloads into ``telemetry-raw``, lose none.

The bridge subscribes with QoS 1 under a persistent MQTT v5 session (stable client
id, clean start off, a long session expiry) and acknowledges each MQTT message only
after Kafka acknowledged the record it became (paho's manual acknowledgement). A
crash at any point therefore loses nothing: Mosquitto redelivers every message that
was not acknowledged, and downstream de-duplication absorbs the repeats.

In flight is bounded by the MQTT v5 *receive maximum* the bridge asks for: once that
many messages await Kafka, Mosquitto stops sending and holds the backlog in its
queue (configure its ``max_queued_messages`` high). So a slow or absent Kafka
costs broker disk, never bridge memory.

The payload bytes are forwarded as received: the bridge does not parse them (the
worker does). It dead-letters only what it can judge without parsing: an empty
payload, one over the size limit, or a topic outside the configured pattern.

One thread: paho's socket hooks let the asyncio loop watch the MQTT socket, so
messages, Kafka deliveries and acknowledgements all run on the event loop with no
hand-over between threads (only the blocking TCP connect runs in a worker thread).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_any,
    stop_when_event_set,
    wait_random_exponential,
)

logger = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"\{(device_id|site)\}")

# Dead-letter records carry at most this much of the original payload (base64), so
# one oversized message cannot make an oversized Kafka record.
DEAD_LETTER_PAYLOAD_LIMIT_BYTES = 64 * 1024
# Messages taken from the inbox at a time and produced as one batch per partition;
# bounded so acknowledgements keep flowing while a large backlog drains.
BURST_MAX = 500
# Header of the idle ticks the bridge writes into telemetry-raw (value: send ms).
TICK_HEADER = "edge_tick"
# MQTT packets read per wake-up of the event loop at most, so a long burst still
# lets Kafka's callbacks run in between.
READS_PER_WAKEUP = 200
# Records per Kafka batch, in bytes; larger than aiokafka's 16 KiB default so a
# burst of small device payloads goes out in few requests.
MAX_BATCH_BYTES = 256 * 1024


class TopicPattern:
    """An MQTT topic pattern such as ``devices/{device_id}/telemetry``.

    ``{device_id}`` (required) and ``{site}`` (optional) each match one topic level.

    >>> p = TopicPattern("sites/{site}/devices/{device_id}/telemetry")
    >>> p.subscription
    'sites/+/devices/+/telemetry'
    >>> p.match("sites/s1/devices/d7/telemetry")
    {'site': 's1', 'device_id': 'd7'}
    >>> p.match("sites/s1/devices/d7/status") is None
    True
    """

    def __init__(self, pattern: str) -> None:
        if "{device_id}" not in pattern:
            raise ValueError(f"topic pattern must contain {{device_id}}: {pattern!r}")
        self.pattern = pattern
        # A level holding a placeholder (even with other text, as in "dev-{device_id}")
        # is subscribed as "+"; the regex below then checks the whole topic.
        self.subscription = "/".join(
            "+" if _PLACEHOLDER.search(level) else level for level in pattern.split("/")
        )
        regex = ""
        for i, part in enumerate(_PLACEHOLDER.split(pattern)):
            # re.split with one group alternates literal text and placeholder names.
            regex += re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)"
        self._regex = re.compile(regex + r"\Z")

    def match(self, topic: str) -> dict[str, str] | None:
        """Return the placeholder values of ``topic``, or None outside the pattern."""
        found = self._regex.match(topic)
        return found.groupdict() if found else None


@dataclass
class BridgeCounters:
    """Running totals of the bridge; ``in_flight`` awaits Kafka's acknowledgement."""

    received: int = 0
    produced: int = 0
    dead_lettered: int = 0
    acknowledged: int = 0
    produce_failures: int = 0
    reconnects: int = 0
    in_flight: int = 0
    idle_ticks: int = 0

    def snapshot(self) -> dict[str, int]:
        """Return the counters as a plain dict."""
        return dict(self.__dict__)


class IdleTickSchedule:
    """When the bridge sends each quiet device's idle ticks.

    The first tick goes ``idle_ms`` after the device's last record, so the worker
    can close what the idle timeout allows. A window that closes on the device's
    own clock (``EDGE_IDLE_CLOSE=clock``) may still be open then, so ticks go on
    every ``max(idle_ms, horizon_ms / 10)`` until ``horizon_ms`` (the longest
    window plus the allowed lateness) has passed since the last record, when no
    window of the device can be open any more: the last tick is the first one
    at least that long after the record. A window therefore comes out at
    most one tick interval after it is due, and a device that stays silent costs
    a bounded number of ticks (3 with the defaults). A new record starts over.

    Not thread-safe; the bridge's pump alone uses it.

    >>> ticks = IdleTickSchedule(idle_ms=30_000, horizon_ms=70_000)
    >>> ticks.seen("press-1", received_ms=0)
    >>> [ticks.due(now_ms) for now_ms in (29_999, 30_000, 60_000, 90_000, 120_000)]
    [[], ['press-1'], ['press-1'], ['press-1'], []]
    """

    def __init__(self, *, idle_ms: int, horizon_ms: int) -> None:
        self.idle_ms = idle_ms
        self.horizon_ms = horizon_ms
        self.every_ms = max(idle_ms, horizon_ms // 10)
        # device id -> (receive time of its last record, time of its next tick), ms
        self._devices: dict[str, tuple[int, int]] = {}
        # No tick is due before this (a lower bound), so the pump, which asks
        # after every burst, looks through the devices only when one may be due.
        self._earliest_ms = 2**63

    def __len__(self) -> int:
        return len(self._devices)

    def seen(self, device_id: str, *, received_ms: int) -> None:
        """Note a record of ``device_id`` received at ``received_ms``."""
        next_ms = received_ms + self.idle_ms
        self._devices[device_id] = (received_ms, next_ms)
        self._earliest_ms = min(self._earliest_ms, next_ms)

    def postpone(self, now_ms: int) -> None:
        """Send no tick before ``idle_ms`` from ``now_ms`` (after a reconnect)."""
        earliest_ms = now_ms + self.idle_ms
        for device_id, (seen_ms, next_ms) in self._devices.items():
            if next_ms < earliest_ms:
                self._devices[device_id] = (seen_ms, earliest_ms)
        self._earliest_ms = max(self._earliest_ms, earliest_ms)

    def due(self, now_ms: int) -> list[str]:
        """Return the devices whose tick is due at ``now_ms`` and plan the next."""
        if now_ms < self._earliest_ms:
            return []
        due = []
        last_ms = max(self.idle_ms, self.horizon_ms)
        earliest_ms = 2**63
        for device_id, (seen_ms, next_ms) in list(self._devices.items()):
            if next_ms > now_ms:
                earliest_ms = min(earliest_ms, next_ms)
                continue
            due.append(device_id)
            if now_ms - seen_ms >= last_ms:
                del self._devices[device_id]
            else:
                next_ms = now_ms + self.every_ms
                self._devices[device_id] = (seen_ms, next_ms)
                earliest_ms = min(earliest_ms, next_ms)
        self._earliest_ms = earliest_ms
        return due


@dataclass(frozen=True, slots=True)
class _Inbound:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    received_at_ms: int
    generation: int


class Bridge:
    """Subscribe to device telemetry over MQTT and produce it to Kafka.

    Use ``async with Bridge(...) as bridge: await bridge.wait_stopped()`` or call
    :meth:`start` and :meth:`stop`. Cancellation of :meth:`wait_stopped` leaves
    the bridge running; call :meth:`stop` to drain and disconnect.
    """

    def __init__(
        self,
        *,
        mqtt_host: str,
        mqtt_port: int,
        client_id: str,
        topic_pattern: str,
        kafka_bootstrap: str,
        raw_topic: str,
        dead_letter_topic: str,
        max_payload_bytes: int = 1024 * 1024,
        max_inflight: int = 1000,
        session_expiry_s: int = 7 * 24 * 3600,
        summary_interval_s: float = 30.0,
        idle_timeout_s: float | None = 30.0,
        idle_tick_horizon_s: float = 70.0,
        reconnect_max_s: float = 10.0,
        producer_factory: Callable[[], AIOKafkaProducer] | None = None,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.pattern = TopicPattern(topic_pattern)
        self.counters = BridgeCounters()
        self._mqtt_host = mqtt_host
        self._mqtt_port = mqtt_port
        self._client_id = client_id
        self._raw_topic = raw_topic
        self._dead_letter_topic = dead_letter_topic
        self._max_payload_bytes = max_payload_bytes
        self._max_inflight = max_inflight
        self._session_expiry_s = session_expiry_s
        self._summary_interval_s = summary_interval_s
        # TODO: the schedule lives in memory only: a device that falls silent just
        # before the bridge restarts gets no tick, and its last windows close only
        # when it sends again. Persist it (a compacted topic) to close them anyway.
        self._idle_ticks = (
            None
            if idle_timeout_s is None
            else IdleTickSchedule(
                idle_ms=round(idle_timeout_s * 1000),
                horizon_ms=round(idle_tick_horizon_s * 1000),
            )
        )
        self._reconnect_max_s = reconnect_max_s
        self._clock_ms = clock_ms
        self._producer_factory = producer_factory or (
            lambda: AIOKafkaProducer(
                bootstrap_servers=kafka_bootstrap,
                acks="all",
                enable_idempotence=True,
                linger_ms=0,
                # Long enough to ride out a broker restart without failing batches;
                # a batch that does fail is redelivered by MQTT (not acknowledged).
                request_timeout_ms=120_000,
                retry_backoff_ms=200,
                max_batch_size=MAX_BATCH_BYTES,
                # Room for one payload at the size limit plus headers; the broker's
                # message.max.bytes must be at least as large (2 MiB in the stack).
                max_request_size=max_payload_bytes + 64 * 1024,
            )
        )
        self._producer: AIOKafkaProducer | None = None
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: collections.deque[_Inbound] = collections.deque()
        self._wake = asyncio.Event()
        self._stopping = threading.Event()
        self._stopped = asyncio.Event()
        self._generation = 0
        self._connected = threading.Event()
        self._loop_thread: int | None = None
        self._socket_open: Any = None
        self._socket_closed = asyncio.Event()
        self._misc_task: asyncio.Task[None] | None = None
        self._mqtt_messages = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._partitions: list[int] = []
        self._refused: collections.deque[tuple[_Inbound, str]] = collections.deque()
        self._partitioner = DefaultPartitioner()

    async def __aenter__(self) -> Bridge:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to Kafka (retrying until it answers), then subscribe over MQTT."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._producer = await self._start_producer()
        self._client = self._new_client()
        self._tasks = [
            asyncio.create_task(self._run_mqtt(), name="bridge-mqtt"),
            asyncio.create_task(self._pump(), name="bridge-pump"),
            asyncio.create_task(self._log_summaries(), name="bridge-summary"),
        ]

        logger.info(
            "bridge started mqtt=%s:%d subscription=%s topic=%s max_inflight=%d",
            self._mqtt_host,
            self._mqtt_port,
            self.pattern.subscription,
            self._raw_topic,
            self._max_inflight,
        )

    async def stop(self) -> None:
        """Stop taking messages, let Kafka acknowledge what is in flight, disconnect.

        Messages Kafka has not acknowledged when the producer stops stay
        unacknowledged over MQTT, so the broker redelivers them next time.
        """
        self._stopping.set()
        mqtt_task = self._tasks[0] if self._tasks else None
        if mqtt_task is not None:
            if self._connected.is_set() and self._client is not None:
                # DISCONNECT goes out on the next writable event; the socket's
                # close then ends the MQTT task.
                self._client.disconnect()
                await asyncio.wait([mqtt_task], timeout=10.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._close_socket_watch()
        if self._producer is not None:
            await self._producer.stop()
        self._stopped.set()
        logger.info("bridge stopped %s", _format_counters(self.counters))

    async def wait_stopped(self) -> None:
        """Wait until :meth:`stop` completed."""
        await self._stopped.wait()

    async def _start_producer(self) -> AIOKafkaProducer:
        delay_s = 0.5
        while True:
            producer = self._producer_factory()
            try:
                await producer.start()
                return producer
            except Exception as exc:  # noqa: BLE001 - any start failure is retried
                await producer.stop()
                logger.warning(
                    "Kafka not reachable, retrying in %.1f s: %s", delay_s, exc
                )
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, self._reconnect_max_s)

    # -- MQTT side (on the event loop) -----------------------------------------------

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        # paho's socket hooks: the event loop watches the socket instead of a
        # network thread of paho's.
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        # paho's own queue of outgoing messages is not used: the bridge only acks.
        client.max_inflight_messages_set(self._max_inflight)
        return client

    async def _run_mqtt(self) -> None:
        """Connect, wait for the connection to end, reconnect with backoff; repeat."""
        client = self._client
        if client is None:
            raise RuntimeError("bridge not started")
        while not self._stopping.is_set():
            self._socket_closed.clear()
            await self._connect_with_backoff(client)
            if self._stopping.is_set() and not self._socket_open:
                break
            await self._socket_closed.wait()
            self._connected.clear()

    async def _connect_with_backoff(self, client: mqtt.Client) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self._session_expiry_s
        properties.ReceiveMaximum = self._max_inflight
        connect = functools.partial(
            client.connect,
            self._mqtt_host,
            self._mqtt_port,
            keepalive=30,
            clean_start=False,
            properties=properties,
        )
        retrying = AsyncRetrying(
            wait=wait_random_exponential(multiplier=0.25, max=self._reconnect_max_s),
            retry=retry_if_exception_type(OSError),
            stop=stop_any(stop_when_event_set(self._stopping)),
            before_sleep=lambda state: logger.warning(
                "MQTT broker not reachable, retrying host=%s port=%d attempt=%d",
                self._mqtt_host,
                self._mqtt_port,
                state.attempt_number,
            ),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    # In a worker thread: name resolution and the TCP connect may
                    # block; the socket hooks hand the new socket to the loop.
                    await asyncio.to_thread(connect)
        except OSError:
            return  # only when stopping

    def _in_loop(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback`` on the event loop, now if this is the loop's thread."""
        if threading.get_ident() == self._loop_thread:
            callback(*args)
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch_socket, client, sock)

    def _watch_socket(self, client: mqtt.Client, sock: Any) -> None:
        if self._loop is None:
            return
        self._socket_open = sock
        self._loop.add_reader(sock, self._on_readable, client)
        self._misc_task = self._loop.create_task(self._keepalive(client))

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._close_socket_watch)

    def _close_socket_watch(self) -> None:
        sock = self._socket_open
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        self._socket_open = None
        if self._misc_task is not None:
            self._misc_task.cancel()
            self._misc_task = None
        self._socket_closed.set()

    def _on_socket_register_write(
        self, client: mqtt.Client, userdata: Any, sock: Any
    ) -> None:
        self._in_loop(self._watch_writable, client, sock)

    def _watch_writable(self, client: mqtt.Client, sock: Any) -> None:
        if self._loop is not None and sock is self._socket_open:
            self._loop.add_writer(sock, client.loop_write)

    def _on_socket_unregister_write(
        self, client: mqtt.Client, userdata: Any, sock: Any
    ) -> None:
        self._in_loop(self._unwatch_writable, sock)

    def _unwatch_writable(self, sock: Any) -> None:
        if self._loop is not None and sock is self._socket_open:
            self._loop.remove_writer(sock)

    def _on_readable(self, client: mqtt.Client) -> None:
        # paho's loop_read handles one packet per call: keep reading while
        # messages come, so a burst costs one wake-up of the loop, not one each.
        for _ in range(READS_PER_WAKEUP):
            before = self._mqtt_messages
            if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                break
            if self._mqtt_messages == before:
                break
        if self._inbox:
            self._wake.set()

    async def _keepalive(self, client: mqtt.Client) -> None:
        while client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:
            await asyncio.sleep(1.0)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            logger.error("MQTT broker refused the connection reason=%s", reason_code)
            client.disconnect()
            return
        self._generation += 1
        if self._generation > 1:
            self.counters.reconnects += 1
        self._connected.set()
        if self._idle_ticks is not None:
            # Devices' messages queued while the bridge was away come first;
            # the outage is no silence of theirs.
            self._idle_ticks.postpone(self._clock_ms())
        # Subscribe on every connect: a broker that lost its state (no persistence,
        # expired session) would otherwise leave the bridge deaf. Retained messages
        # only when the subscription is new, or each reconnect would count them
        # again.
        options = SubscribeOptions(qos=1, retainHandling=1)
        client.subscribe(self.pattern.subscription, options=options)
        logger.info(
            "MQTT connected host=%s port=%d session_present=%s subscription=%s",
            self._mqtt_host,
            self._mqtt_port,
            flags.session_present,
            self.pattern.subscription,
        )

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        # Acknowledgements of this connection's messages are not sent on the
        # next one: the broker redelivers those messages instead.
        self._connected.clear()
        if not self._stopping.is_set():
            logger.warning("MQTT connection lost reason=%s", reason_code)

    def _on_message(
        self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        self._mqtt_messages += 1
        self._inbox.append(
            _Inbound(
                topic=message.topic,
                payload=bytes(message.payload),
                qos=message.qos,
                retain=message.retain,
                mid=message.mid,
                received_at_ms=self._clock_ms(),
                generation=self._generation,
            )
        )

    def _acknowledge(self, inbound: _Inbound) -> None:
        # An ack belongs to the connection that delivered the message; after a
        # reconnect the broker redelivers it and the copy is acknowledged instead.
        client = self._client
        if (
            client is None
            or inbound.generation != self._generation
            or not self._connected.is_set()
        ):
            return
        if inbound.qos > 0:
            client.ack(inbound.mid, inbound.qos)
        self.counters.acknowledged += 1

    # -- Kafka side (asyncio) --------------------------------------------------------

    async def _pump(self) -> None:
        inbox = self._inbox
        ticks = self._idle_ticks
        tick_every_s = (
            None if ticks is None else max(0.2, min(ticks.idle_ms / 4000, 5.0))
        )
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=tick_every_s)
            except TimeoutError:
                pass
            self._wake.clear()
            while self._refused:
                inbound, reason = self._refused.popleft()
                fields = self.pattern.match(inbound.topic) or {}
                device_id = fields.get("device_id", "")
                self.counters.in_flight -= 1
                producer = self._producer
                if producer is not None:
                    self.counters.in_flight += 1
                    await self._send_dead_letter(producer, inbound, reason, device_id)
            while inbox:
                burst = [inbox.popleft() for _ in range(min(len(inbox), BURST_MAX))]
                await self._forward_burst(burst)
            if ticks is not None:
                # Here, with the inbox drained, every record received so far is
                # in the producer ahead of any tick sent now.
                await self._send_idle_ticks(ticks)

    async def _forward_burst(self, burst: list[_Inbound]) -> None:
        """Produce a burst as one record batch per partition, in arrival order."""
        producer = self._producer
        if producer is None:
            raise RuntimeError("bridge not started")
        partitions = await self._raw_partitions(producer)
        by_partition: dict[int, list[tuple[_Inbound, bytes]]] = {}
        for inbound in burst:
            self.counters.received += 1
            self.counters.in_flight += 1
            problem, device_id = self._check(inbound)
            if problem is not None:
                await self._send_dead_letter(producer, inbound, problem, device_id)
                continue
            key = device_id.encode()
            # The producer's own default partitioner, so a device's records (and
            # its idle ticks) share one partition.
            partition = self._partitioner(key, partitions, partitions)
            if self._idle_ticks is not None:
                self._idle_ticks.seen(device_id, received_ms=inbound.received_at_ms)
            by_partition.setdefault(partition, []).append((inbound, key))
        for partition, items in by_partition.items():
            await self._send_batches(producer, partition, items)

    async def _send_idle_ticks(self, ticks: IdleTickSchedule) -> None:
        """Send the idle ticks that are due (see :class:`IdleTickSchedule`).

        A tick is an empty record with the header ``edge_tick`` (its send time,
        on this bridge's clock) in the device's partition. The pump sends it
        only with its inbox drained, so after every record of the device
        received before; this producer keeps that order even through retries
        (idempotence). When the worker reads the tick it has read all of them:
        it may close the device's idle windows without cutting off a reading
        still on its way, even after Kafka was down for a while.
        """
        producer = self._producer
        if producer is None or not ticks or not self._connected.is_set():
            # Cut off from MQTT, the bridge cannot tell a quiet device from one
            # whose messages wait for it at the broker: no ticks until back.
            return
        now_ms = self._clock_ms()
        due = ticks.due(now_ms)
        if not due:
            return
        partitions = await self._raw_partitions(producer)
        for device_id in due:
            key = device_id.encode()
            future = await producer.send(
                self._raw_topic,
                value=b"",
                key=key,
                partition=self._partitioner(key, partitions, partitions),
                headers=[(TICK_HEADER, str(now_ms).encode())],
            )
            future.add_done_callback(self._tick_delivered)

    def _tick_delivered(self, future: asyncio.Future[Any]) -> None:
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            # The device's last windows then close when it sends again.
            logger.warning("idle tick not delivered to Kafka: %r", error)
        else:
            self.counters.idle_ticks += 1

    async def _raw_partitions(self, producer: AIOKafkaProducer) -> list[int]:
        if not self._partitions:
            self._partitions = sorted(await producer.partitions_for(self._raw_topic))
        return self._partitions

    async def _send_batches(
        self,
        producer: AIOKafkaProducer,
        partition: int,
        items: list[tuple[_Inbound, bytes]],
    ) -> None:
        batch = producer.create_batch()
        members: list[_Inbound] = []
        for inbound, key in items:
            headers = _headers(inbound)
            appended = batch.append(
                key=key, value=inbound.payload, timestamp=None, headers=headers
            )
            if appended is None:  # batch full: send it and start the next one
                await self._send_batch(producer, batch, partition, members)
                batch = producer.create_batch()
                members = []
                batch.append(
                    key=key, value=inbound.payload, timestamp=None, headers=headers
                )
            members.append(inbound)
        await self._send_batch(producer, batch, partition, members)

    async def _send_batch(
        self,
        producer: AIOKafkaProducer,
        batch: Any,
        partition: int,
        members: list[_Inbound],
    ) -> None:
        future = await producer.send_batch(batch, self._raw_topic, partition=partition)
        future.add_done_callback(lambda f: self._delivered_batch(members, f))

    async def _send_dead_letter(
        self,
        producer: AIOKafkaProducer,
        inbound: _Inbound,
        problem: str,
        device_id: str,
    ) -> None:
        logger.warning(
            "dead-lettering MQTT message topic=%s reason=%s", inbound.topic, problem
        )
        future = await producer.send(
            self._dead_letter_topic,
            value=_dead_letter(inbound, problem, device_id or None),
            key=device_id.encode() if device_id else None,
            headers=_headers(inbound),
        )
        future.add_done_callback(lambda f: self._delivered(inbound, f, True))

    def _delivered_batch(
        self, members: list[_Inbound], future: asyncio.Future[Any]
    ) -> None:
        for inbound in members:
            self._delivered(inbound, future, False)

    def _check(self, inbound: _Inbound) -> tuple[str | None, str]:
        fields = self.pattern.match(inbound.topic)
        if fields is None:
            return (
                f"MQTT topic {inbound.topic!r} does not match the pattern "
                f"{self.pattern.pattern!r}",
                "",
            )
        device_id = fields["device_id"]
        size = len(inbound.payload)
        if size == 0:
            return "payload is empty (0 bytes)", device_id
        if size > self._max_payload_bytes:
            return (
                f"payload is {size} bytes, over the limit of "
                f"{self._max_payload_bytes} bytes (EDGE_BRIDGE_MAX_PAYLOAD_BYTES)",
                device_id,
            )
        return None, device_id

    def _delivered(
        self, inbound: _Inbound, future: asyncio.Future[Any], dead_letter: bool
    ) -> None:
        self.counters.in_flight -= 1
        error = None if future.cancelled() else future.exception()
        if isinstance(error, KafkaError) and not error.retriable and not dead_letter:
            # Redelivering a record Kafka refuses for good (too large for the
            # broker, say) would loop forever: dead-letter it instead.
            self.counters.in_flight += 1
            self._refused.append((inbound, f"Kafka refused the record: {error!r}"))
            self._wake.set()
            return
        if future.cancelled() or error is not None:
            self.counters.produce_failures += 1
            logger.error(
                "Kafka did not take a message; it stays unacknowledged over MQTT and"
                " will be redelivered topic=%s error=%r",
                inbound.topic,
                None if future.cancelled() else future.exception(),
            )
            self._force_redelivery()
            return
        if dead_letter:
            self.counters.dead_lettered += 1
        else:
            self.counters.produced += 1
        self._acknowledge(inbound)

    def _force_redelivery(self) -> None:
        # Reconnecting makes the broker resend every unacknowledged message, in order.
        client = self._client
        if client is not None and self._connected.is_set():
            client.disconnect()

    async def _log_summaries(self) -> None:
        while True:
            await asyncio.sleep(self._summary_interval_s)
            logger.info("bridge %s", _format_counters(self.counters))


def _headers(inbound: _Inbound) -> list[tuple[str, bytes]]:
    return [
        ("mqtt_topic", inbound.topic.encode()),
        ("mqtt_qos", str(inbound.qos).encode()),
        ("mqtt_retain", b"1" if inbound.retain else b"0"),
        ("received_at_ms", str(inbound.received_at_ms).encode()),
    ]


def _dead_letter(inbound: _Inbound, reason: str, device_id: str | None) -> bytes:
    payload = inbound.payload[:DEAD_LETTER_PAYLOAD_LIMIT_BYTES]
    return orjson.dumps(
        {
            "stage": "bridge",
            "reason": reason,
            "source": f"mqtt:{inbound.topic}",
            "device_id": device_id,
            "partition": None,
            "offset": None,
            "received_at_ms": inbound.received_at_ms,
            "payload_b64": base64.b64encode(payload).decode(),
            "truncated": len(payload) < len(inbound.payload),
            "field": None,
        }
    )


def _format_counters(counters: BridgeCounters) -> str:
    return " ".join(f"{k}={v}" for k, v in counters.snapshot().items())


class CommandPublisher:
    """Publish decision commands to devices over MQTT with QoS 1.

    ``publish`` is safe to call from the asyncio loop: paho queues the message and
    its network thread sends it, redelivering after a reconnect. Messages queued
    while the broker is unreachable are bounded by ``max_queued``; past that they
    are counted as dropped (the decision itself is on Kafka either way).
    """

    def __init__(
        self, *, host: str, port: int, client_id: str, max_queued: int = 10_000
    ) -> None:
        self._host = host
        self._port = port
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        self._client.max_queued_messages_set(max_queued)
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.published = 0
        self.dropped = 0
        self.refused = 0

    def start(self) -> None:
        """Connect in the background; publishing works before the broker answers."""
        self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: str | bytes) -> None:
        """Queue one command; never blocks, never raises for a bad topic.

        A topic MQTT cannot publish to (a wildcard ``+`` or ``#``, empty, too
        long), which a rule's template can make from a device's metric name, is
        counted as refused and logged; the decision record is on Kafka anyway.
        """
        try:
            info = self._client.publish(topic, payload, qos=1)
        except ValueError as exc:
            self.refused += 1
            logger.warning("command not published, %s topic=%r", exc, topic)
            return
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self.dropped += 1
            logger.warning("command queue full, command dropped topic=%s", topic)
        else:
            self.published += 1

    def snapshot(self) -> dict[str, int]:
        """Return published, dropped (queue full) and refused (bad topic) counts."""
        return {
            "published": self.published,
            "dropped": self.dropped,
            "refused": self.refused,
        }
