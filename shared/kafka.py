"""Kafka helpers: the producer every service uses, topic creation, and the typed consume loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    InvalidProducerEpoch,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    TopicAlreadyExistsError,
    UnknownProducerId,
)
from pydantic import ValidationError

from shared import tracing
from shared.messages import DeadLetter, Message
from shared.topics import TOPIC_SPECS, TopicName, Topics

if TYPE_CHECKING:
    from shared.config import ServiceSettings

log = logging.getLogger(__name__)

# Keyword arguments of every aiokafka client (producer, consumer, admin) that say how to connect
# and authenticate; empty means PLAINTEXT without authentication.
KafkaOptions = Mapping[str, Any]


@functools.lru_cache(maxsize=16)
def _ssl_context(cafile: str | None) -> ssl.SSLContext:
    # One context per CA file, shared by the process's clients: verification of the broker's
    # certificate and host name stays on (create_default_context's defaults).
    return ssl.create_default_context(cafile=cafile)


def kafka_security_options(
    protocol: str,
    *,
    username: str | None = None,
    password: str | None = None,
    cafile: str | None = None,
    mechanism: str = "SCRAM-SHA-512",
) -> dict[str, Any]:
    """aiokafka keyword arguments for ``protocol`` (PLAINTEXT, SSL or SASL_SSL)."""
    if protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": protocol, "ssl_context": _ssl_context(cafile)}
    if protocol.startswith("SASL_"):
        options |= {
            "sasl_mechanism": mechanism,
            "sasl_plain_username": username,
            "sasl_plain_password": password,
        }
    return options


def kafka_client_options(settings: ServiceSettings) -> dict[str, Any]:
    """How this service connects to Kafka (HOSTISO_KAFKA_SECURITY_PROTOCOL and friends)."""
    password = settings.kafka_sasl_password
    return kafka_security_options(
        settings.kafka_security_protocol,
        username=settings.kafka_sasl_username,
        password=password.get_secret_value() if password is not None else None,
        cafile=settings.kafka_ssl_cafile,
        mechanism=settings.kafka_sasl_mechanism,
    )


DLQ_PAYLOAD_LIMIT = 64 * 1024
# A dead letter never exceeds this many bytes (the topic accepts 1 MiB): key and payload are
# escaped first, then cut, so JSON escaping cannot grow them past it.
DLQ_MAX_BYTES = 256 * 1024
DLQ_KEY_LIMIT = 1024
DLQ_REASON_LIMIT = 4000


class Producer(Protocol):
    """The part of a Kafka producer the services use (``LazyClient`` around AIOKafkaProducer)."""

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = ...,
        key: bytes | None = ...,
        partition: int | None = ...,
        timestamp_ms: int | None = ...,
        headers: Any = ...,
    ) -> Any: ...


# Producer errors after which aiokafka's idempotent producer keeps failing until it is replaced.
PRODUCER_STATE_ERRORS: tuple[type[Exception], ...] = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    ProducerFenced,
)


class LazyClient:
    """An aiokafka client built on ``start()``, inside the running loop; attributes forward to it.

    aiokafka binds its clients to the running event loop at construction, so wiring code (a
    ``build_app`` that runs before the loop) holds this handle instead. A failed ``start()`` drops
    the half-started client, so a retry builds a fresh one.
    """

    def __init__(
        self,
        factory: Callable[[], Any],
        what: str,
        prepare: Callable[[Any], None] | None = None,
    ) -> None:
        self._factory = factory
        self._prepare = prepare
        self._what = what
        self._client: Any = None
        self._broken: Any = None
        self._rebuild_lock = asyncio.Lock()
        # Callers that start() at once (sixteen relay shards warming one consumer) must share one
        # client: without the lock each built and started its own, and all but the last leaked.
        self._start_lock = asyncio.Lock()
        # Records the broker acknowledged, by topic (producers only): read by /metrics.
        self.records_acked: Counter[str] = Counter()

    @property
    def started(self) -> bool:
        return self._client is not None

    async def start(self) -> None:
        if self._client is not None:
            return
        async with self._start_lock:
            if self._client is not None:
                return  # started by a concurrent caller while this one waited
            client = self._factory()
            if self._prepare is not None:
                self._prepare(client)
            try:
                await client.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await client.stop()
                raise
            self._client = client

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.stop()

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            raise RuntimeError(f"{self._what} used before start()")
        return getattr(self._client, name)

    async def send_and_wait(self, topic: str, *args: Any, **kwargs: Any) -> Any:
        """The producer's ``send_and_wait``, counted once the broker acknowledged it."""
        await self._rebuild_if_broken()
        client = self._client
        try:
            metadata = await self.__getattr__("send_and_wait")(topic, *args, **kwargs)
        except PRODUCER_STATE_ERRORS:
            self._broken = client
            raise
        self.records_acked[topic] += 1
        return metadata

    async def send(self, topic: str, *args: Any, **kwargs: Any) -> Any:
        """The producer's ``send``; the returned future counts the record when acknowledged."""
        await self._rebuild_if_broken()
        client = self._client
        future = await self.__getattr__("send")(topic, *args, **kwargs)
        future.add_done_callback(lambda done: self._on_sent(topic, client, done))
        return future

    def _on_sent(self, topic: str, client: Any, done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            return
        error = done.exception()
        if error is None:
            self.records_acked[topic] += 1
        elif isinstance(error, PRODUCER_STATE_ERRORS):
            self._broken = client

    async def _rebuild_if_broken(self) -> None:
        """Replace a producer whose idempotence state the broker no longer accepts.

        After a broker restart aiokafka's idempotent producer can fail every later send with
        OutOfOrderSequenceNumber / UnknownProducerId and never recover. The failed send was
        already reported to its caller (who retries: consumers rewind, HTTP answers 503); a new
        producer gets a new producer id, so the retry goes through.
        """
        if self._broken is None:
            return
        async with self._rebuild_lock:
            broken, self._broken = self._broken, None
            if broken is None or broken is not self._client:
                return
            log.warning("%s lost its idempotent-producer state; rebuilding it", self._what)
            self._client = None
            with contextlib.suppress(Exception):
                await broken.stop()
            await self.start()


def make_producer(
    bootstrap: str,
    *,
    linger_ms: int = 5,
    client_id: str = "hostiso",
    options: KafkaOptions | None = None,
) -> Any:
    """A producer that never loses or reorders an acknowledged send: acks=all + idempotence."""
    return LazyClient(
        lambda: AIOKafkaProducer(
            **(options or {}),
            bootstrap_servers=bootstrap,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            request_timeout_ms=15_000,
            max_request_size=2 * 1024 * 1024,
        ),
        f"Kafka producer {client_id}",
    )


# How long settings.allowlist.v1 keeps every version before compaction may drop superseded ones.
REVOCATION_RETENTION_MS = 7 * 24 * 3600 * 1000


async def ensure_topics(
    bootstrap: str,
    topics: Topics,
    *,
    replication_factor: int = 1,
    min_insync_replicas: int | None = None,
    names: Iterable[TopicName] | None = None,
    partitions: Mapping[TopicName, int] | None = None,
    options: KafkaOptions | None = None,
) -> list[str]:
    """Create the topics of TOPIC_SPECS (or ``names``) that are missing; returns those created.

    ``partitions`` overrides the specs' partition counts (``HOSTISO_TOPIC_PARTITIONS``); a topic
    that exists keeps its count (growing one is an operator's ``kafka-topics --alter``, since it
    moves keys to other partitions).
    """
    wanted = {n for n in names} if names is not None else None
    admin = AIOKafkaAdminClient(
        **(options or {}), bootstrap_servers=bootstrap, request_timeout_ms=15_000
    )
    await admin.start()
    created: list[str] = []
    try:
        existing = set(await admin.list_topics())
        new_topics = []
        for spec in TOPIC_SPECS:
            if wanted is not None and spec.name not in wanted:
                continue
            full = topics(spec.name)
            if full in existing:
                continue
            configs = {"cleanup.policy": spec.cleanup_policy}
            if min_insync_replicas is not None:
                configs["min.insync.replicas"] = str(min_insync_replicas)
            if spec.compacted:
                # Compact promptly so a rebuilding consumer reads little more than the state.
                configs["min.cleanable.dirty.ratio"] = "0.1"
                configs["segment.ms"] = "600000"
            if spec.name == TopicName.SETTINGS_ALLOWLIST:
                # A version that revokes an entry must reach the isolation service's revocation
                # group even if a newer version follows at once: compaction keeps every record
                # for this long (the group may lag that much, e.g. isolation down, and still fan
                # the revocation out).
                configs["min.compaction.lag.ms"] = str(REVOCATION_RETENTION_MS)
            count = (partitions or {}).get(spec.name, spec.partitions)
            new_topics.append(NewTopic(full, count, replication_factor, topic_configs=configs))
            created.append(full)
        if new_topics:
            try:
                response = await admin.create_topics(new_topics)
            except TopicAlreadyExistsError:
                log.info("topics created concurrently by another process")
            else:
                _raise_unless_created(response)
            await _wait_for_leaders(admin, created)
    finally:
        await admin.close()
    return created


class TopicProvisioningError(RuntimeError):
    """The broker refused to create topics (e.g. a service principal without CREATE rights)."""


_TOPIC_ALREADY_EXISTS = 36


def _raise_unless_created(response: Any) -> None:
    # With ACLs a service may not create topics: say so at once instead of waiting for leaders
    # of topics that will never exist.
    refused = [
        f"{topic}: {message or code}"
        for topic, code, *rest in response.topic_errors
        for message in [rest[0] if rest else None]
        if code not in (0, _TOPIC_ALREADY_EXISTS)
    ]
    if refused:
        raise TopicProvisioningError(
            "could not create topics (provision them as admin: python -m shared.infra topics): "
            + "; ".join(refused)
        )


async def _wait_for_leaders(admin: Any, names: list[str], timeout: float = 60.0) -> None:
    """Wait until every partition of ``names`` has a leader the brokers know of.

    Creation returns once the controller committed it; a producer that writes before the
    brokers applied that metadata gets NotLeaderForPartition and retries until its timeout.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    pending = set(names)
    while pending:
        described = await admin.describe_topics(sorted(pending))
        for topic in described:
            parts = topic.get("partitions") or []
            if topic.get("error_code", 0) == 0 and parts and all(p["leader"] >= 0 for p in parts):
                pending.discard(topic["topic"])
        if not pending:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"topics without leaders after {timeout}s: {sorted(pending)}")
        await asyncio.sleep(0.1)


async def wait_topics_ready(
    bootstrap: str,
    names: Iterable[str],
    *,
    timeout: float = 30.0,
    options: KafkaOptions | None = None,
) -> None:
    """Wait until every topic has a leader for each partition (metadata propagated)."""
    deadline = asyncio.get_running_loop().time() + timeout
    wanted = set(names)
    producer = AIOKafkaProducer(**(options or {}), bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for name in wanted:
            while True:
                parts = await producer.partitions_for(name)
                if parts:
                    break
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"topic {name} has no partitions after {timeout}s")
                await asyncio.sleep(0.1)
    finally:
        await producer.stop()


async def publish(producer: Producer, topic: str, key: str, message: Message) -> Any:
    """Send one message and wait for the broker's acknowledgement (acks=all).

    With tracing on, the record carries the trace context in its headers.
    """
    if not tracing.enabled():
        return await producer.send_and_wait(topic, message.to_bytes(), key=key.encode())
    with tracing.publish_span(topic, key, message) as headers:
        return await producer.send_and_wait(
            topic, message.to_bytes(), key=key.encode(), headers=headers
        )


class MessageRejected(Exception):
    """A well-formed message that the handler refuses for good (unknown endpoint, wrong account...).

    The consume loop sends it to the DLQ with ``reason`` and carries on; it is never retried.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _escaped(raw: bytes, limit: int) -> tuple[str, bool]:
    """``raw`` as printable text (control and non-UTF-8 bytes escaped), cut to ``limit`` chars."""
    text = raw.decode("utf-8", "backslashreplace")
    text = "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)
    return text[:limit], len(text) > limit


def bounded_dead_letter(
    record: ConsumerRecord[bytes, bytes], group: str, reason: str, max_bytes: int = DLQ_MAX_BYTES
) -> DeadLetter:
    """The dead letter of ``record``, at most ``max_bytes`` once serialized.

    An oversized letter would be refused by the broker and its record retried for ever; so the
    payload is cut until the letter fits, and if even an empty payload does not fit (a huge key
    or reason), a minimal letter says only where the record came from.
    """
    key = None
    if record.key is not None:
        key = _escaped(record.key, DLQ_KEY_LIMIT)[0]
    payload, truncated = _escaped(record.value or b"", DLQ_PAYLOAD_LIMIT)
    limit = len(payload)
    while True:
        letter = DeadLetter(
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            consumer_group=group,
            reason=reason[:DLQ_REASON_LIMIT],
            key=key,
            payload=payload[:limit],
            payload_truncated=truncated or limit < len(payload),
        )
        if len(letter.to_bytes()) <= max_bytes:
            return letter
        if limit == 0:
            break
        limit //= 2
    return DeadLetter(
        source_topic=record.topic[:255],
        source_partition=record.partition,
        source_offset=record.offset,
        consumer_group=group[:255],
        reason=reason[:200],
        key=None,
        payload="",
        payload_truncated=True,
    )


class DeadLetterSink:
    """Publishes rejected records on ``dlq.v1`` with their reason and origin (bounded in size)."""

    def __init__(
        self,
        producer: Producer,
        topics: Topics,
        consumer_group: str,
        on_dead_letter: Callable[[], None] | None = None,
    ) -> None:
        self._on_dead_letter = on_dead_letter
        self._producer = producer
        self._topic = topics.dlq
        self._group = consumer_group
        self.count = 0

    async def send(self, record: ConsumerRecord[bytes, bytes], reason: str) -> None:
        letter = bounded_dead_letter(record, self._group, reason)
        await publish(self._producer, self._topic, record.topic, letter)
        self.count += 1
        if self._on_dead_letter is not None:
            self._on_dead_letter()
        log.warning(
            "dead-lettered record",
            extra={
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "reason": reason[:300],
            },
        )


def describe_validation_error(exc: ValidationError) -> str:
    """A short reason naming each failing field and rule."""
    parts = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "<message>"
        parts.append(f"{loc}: {err.get('msg')}")
    return "invalid message: " + "; ".join(parts)


Handler = Callable[[Any, ConsumerRecord[bytes, bytes]], Awaitable[None]]

# How long the broker holds a fetch that finds no new record. It costs no latency: with
# fetch_min_bytes=1 the broker answers the moment a record arrives. It only sets how often an
# idle consumer asks again; each fetch of six partitions costs the broker ~1-2 ms of CPU, so
# aiokafka's 500 ms made the services' idle consumers a large share of the broker's CPU per
# isolation. Its one cost: a partition rewound after a failure is fetched again once the fetch
# in flight returns (at most this long, on top of the loop's backoff).
FETCH_MAX_WAIT_MS = 2000


def make_consumer(
    bootstrap: str,
    *topics: str,
    group_id: str | None,
    client_id: str = "hostiso",
    auto_offset_reset: str = "earliest",
    group_instance_id: str | None = None,
    listener: ConsumerRebalanceListener | None = None,
    options: KafkaOptions | None = None,
) -> Any:
    """A consumer with auto-commit off: the consume loop commits after effects are stored.

    ``group_instance_id`` makes the member static (a restart within the session timeout gets
    its partitions back without a rebalance); ``listener`` is told of revocations/assignments.
    """

    def subscribe_with_listener(client: Any) -> None:
        # Before start(): re-subscribing to the same topics only attaches the listener.
        if listener is not None:
            client.subscribe(list(topics), listener=listener)

    return LazyClient(
        lambda: AIOKafkaConsumer(
            *topics,
            **(options or {}),
            bootstrap_servers=bootstrap,
            group_id=group_id,
            group_instance_id=group_instance_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            isolation_level="read_committed",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        ),
        f"Kafka consumer {client_id}",
        prepare=subscribe_with_listener,
    )
