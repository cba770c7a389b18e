"""Replicas of the compacted topics, read from the start by every instance, with catch-up on demand."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from services.isolation.adapters.redis_store import RedisReplicaStore
from services.isolation.domain import EndpointRecord
from services.isolation.inventory import InventoryRow
from shared.consume import DEFAULT_MAX_ATTEMPTS, FETCHED_AT, ConsumeLoop, PerRecord, typed
from shared.kafka import DeadLetterSink, KafkaOptions, MessageRejected
from shared.messages import AllowlistChanged, EndpointRegistered
from shared.topics import TopicName, Topics

log = logging.getLogger(__name__)

Apply = Callable[[Any, ConsumerRecord[bytes, bytes]], Awaitable[None]]


SETTINGS_CACHE_SIZE = 10_000
ENDPOINT_CACHE_SIZE = 100_000

T = TypeVar("T")


class NewestCache(Generic[T]):
    """A bounded in-memory copy of replica entries that only ever moves to a newer version."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, tuple[int, T]] = OrderedDict()

    def get(self, key: str) -> T | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def offer(self, key: str, value: T, version: int) -> None:
        """Keep ``value`` unless the cache holds a newer (or as new) version of ``key``."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] >= version:
            return
        self._entries[key] = (version, value)
        self._entries.move_to_end(key)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)


class ReplicaLagError(Exception):
    """The replica did not reach the partition's end offset in time."""


class CompactedTopicReplica:
    """Reads one compacted topic from the beginning, without a consumer group.

    Every instance reads every partition itself, so it knows exactly how far its replica got and
    can wait for a partition's end offset (read-your-writes). Redis absorbs the replays: applying
    an event twice or an older one changes nothing.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        name: TopicName,
        apply: Apply,
        dlq: DeadLetterSink,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        kafka_options: KafkaOptions | None = None,
    ) -> None:
        self._max_attempts = max_attempts
        self.loop: ConsumeLoop | None = None
        self._bootstrap = bootstrap
        self._kafka_options = kafka_options or {}
        self._topics = topics
        self._name = name
        self.topic = topics(name)
        self._apply = apply
        self._dlq = dlq
        self._consumer: Any = None
        self._offsets: Any = None
        self._partitions: list[int] = []
        self._positions: dict[int, int] = {}
        self._progress = asyncio.Condition()
        self._started = asyncio.Event()
        self._partitioner = DefaultPartitioner()
        self._lookup: tuple[float, asyncio.Future[dict[int, int]]] | None = None
        self._next_lookup: asyncio.Future[dict[int, int]] | None = None
        self.caught_up_once = False

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            **self._kafka_options,
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            client_id=f"hostiso-isolation-replica-{self._name.value}",
        )
        await self._consumer.start()
        # End offsets are asked on a connection of their own: the broker answers requests of one
        # connection in order, so behind the replica's long-poll fetch they would wait for it.
        self._offsets = AIOKafkaConsumer(
            **self._kafka_options,
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            client_id=f"hostiso-isolation-offsets-{self._name.value}",
        )
        await self._offsets.start()
        # Without a group, subscribing assigns every partition, with no committed offsets:
        # the replica reads from the beginning of the compacted topic.
        self._consumer.subscribe([self.topic])
        while not self._consumer.assignment():
            await self._consumer.getmany(timeout_ms=100, max_records=1)
            if self._consumer.assignment():
                break
        self._partitions = sorted(tp.partition for tp in self._consumer.assignment())
        tps = [TopicPartition(self.topic, p) for p in self._partitions]
        await self._consumer.seek_to_beginning(*tps)
        self._positions = {p: 0 for p in self._partitions}
        self.loop = ConsumeLoop(
            self._consumer,
            PerRecord(typed(self._topics, self._apply)),
            self._dlq,
            name=f"replica-{self._name.value}",
            max_records=1000,
            max_attempts=self._max_attempts,
            after_batch=self._publish_positions,
            group=False,
        )
        self._started.set()

    async def run(self) -> None:
        """The replica's consume loop (run and restarted by the runtime's supervisor).

        A transient failure (Redis away) retries the record until it is stored, and the
        partition's position does not move past it meanwhile; a record that keeps failing
        otherwise is dead-lettered after ``max_attempts`` (guarantee 12).
        """
        if self.loop is None:
            raise RuntimeError("replica run() before start()")
        await self.loop.run()

    def stalled(self, after_s: float = 120.0) -> bool:
        """Not back from a fetch for ``after_s`` (readiness)."""
        return self.loop is not None and time.monotonic() - self.loop.last_poll > after_s

    async def stop(self) -> None:
        for consumer in (self._consumer, self._offsets):
            if consumer is not None:
                await consumer.stop()

    async def _publish_positions(self) -> None:
        # Positions only move after the records before them are stored in Redis.
        positions = {
            p: await self._consumer.position(TopicPartition(self.topic, p))
            for p in self._partitions
        }
        async with self._progress:
            self._positions = positions
            self._progress.notify_all()

    def partition_for(self, key: str) -> int:
        """The producer's partition for ``key`` (murmur2, like every Kafka client's default)."""
        part: int = self._partitioner(key.encode(), self._partitions, self._partitions)
        return part

    async def catch_up(self, key: str, timeout: float) -> None:
        """Wait until the replica holds everything written for ``key`` before the request.

        The request is the record being handled (its fetch time, from the lane) or, outside a
        lane, this call. Everything acknowledged before it is below the partition's end offset
        as looked up by any ListOffsets that STARTED after it, so concurrent callers share one
        lookup instead of queueing a round trip each.
        """
        since = FETCHED_AT.get()
        if since is None:
            since = asyncio.get_running_loop().time()
        if not self._started.is_set():
            # A request handled before start() knew the partitions (an instance restarted under
            # load: its lanes fetch at once): a lag like any other, transient, not a poison.
            try:
                async with asyncio.timeout(timeout):
                    await self._started.wait()
            except TimeoutError as exc:
                raise ReplicaLagError(f"{self.topic} replica not started in {timeout}s") from exc
        part = self.partition_for(key)
        latest = self._lookup
        if (
            latest is not None
            and latest[0] >= since
            and latest[1].done()
            and not latest[1].cancelled()
            and latest[1].exception() is None
            and self._positions.get(part, 0) >= latest[1].result()[part]
        ):
            # The usual case under load: a finished lookup that started after the request was
            # fetched, and the replica already past it.
            return
        try:
            async with asyncio.timeout(timeout):
                await self._started.wait()
                end = (await self._end_offsets_since(since))[part]
                if self._positions.get(part, 0) >= end:
                    return
                async with self._progress:
                    await self._progress.wait_for(lambda: self._positions.get(part, 0) >= end)
        except TimeoutError as exc:
            raise ReplicaLagError(
                f"{self.topic}[{part}] replica did not catch up in {timeout}s"
            ) from exc

    async def catch_up_all(self, timeout: float) -> None:
        """Wait until the replica holds everything written to any partition before the call.

        For reads that span keys (an account's inventory): one shared end-offset lookup, as in
        ``catch_up``, then a wait for every partition to reach it.
        """
        since = FETCHED_AT.get()
        if since is None:
            since = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(timeout):
                await self._started.wait()
                ends = await self._end_offsets_since(since)

                def reached() -> bool:
                    return all(self._positions.get(p, 0) >= end for p, end in ends.items())

                if reached():
                    return
                async with self._progress:
                    await self._progress.wait_for(reached)
        except TimeoutError as exc:
            raise ReplicaLagError(f"{self.topic} replica did not catch up in {timeout}s") from exc

    async def _end_offsets_since(self, since: float) -> dict[int, int]:
        """End offsets of every partition from a lookup that started at or after ``since``."""
        latest = self._lookup
        if latest is not None and latest[0] >= since:
            lookup = latest[1]
            if not lookup.done() or (not lookup.cancelled() and lookup.exception() is None):
                return await asyncio.shield(lookup)
        if self._next_lookup is None:
            self._next_lookup = asyncio.ensure_future(self._start_lookup())
        return await asyncio.shield(self._next_lookup)

    async def _start_lookup(self) -> dict[int, int]:
        # One lookup in flight at a time: callers arriving meanwhile all join the next one, which
        # starts after each of them asked (so after each of their requests was fetched).
        latest = self._lookup
        if latest is not None and not latest[1].done():
            await asyncio.wait([latest[1]])
        lookup = asyncio.ensure_future(self._list_end_offsets())
        self._lookup = (asyncio.get_running_loop().time(), lookup)
        self._next_lookup = None
        return await lookup

    async def _list_end_offsets(self) -> dict[int, int]:
        tps = [TopicPartition(self.topic, p) for p in self._partitions]
        ends = await self._offsets.end_offsets(tps)
        return {tp.partition: int(ends[tp]) for tp in tps}

    async def caught_up_all(self) -> bool:
        """True once the replica has read every partition to the end (readiness)."""
        if self.caught_up_once:
            return True
        if not self._started.is_set():
            return False
        tps = [TopicPartition(self.topic, p) for p in self._partitions]
        ends = await self._offsets.end_offsets(tps)
        self.caught_up_once = all(self._positions.get(tp.partition, 0) >= ends[tp] for tp in tps)
        return self.caught_up_once


class SettingsReplica:
    """The accounts' allowlists, from ``settings.allowlist.v1``.

    Besides Redis, the newest allowlists this process applied are kept in memory (bounded): the
    replica updates them right after Redis, before its position moves, so after a catch-up the
    memory copy is as new as Redis would be; a miss reads Redis.
    """

    def __init__(
        self,
        store: RedisReplicaStore,
        bootstrap: str,
        topics: Topics,
        dlq: DeadLetterSink,
        catch_up_timeout: float,
        cache_size: int = SETTINGS_CACHE_SIZE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        kafka_options: KafkaOptions | None = None,
    ) -> None:
        self._store = store
        self._timeout = catch_up_timeout
        self._cache: NewestCache[AllowlistChanged] = NewestCache(cache_size)
        self.replica = CompactedTopicReplica(
            bootstrap,
            topics,
            TopicName.SETTINGS_ALLOWLIST,
            self._apply,
            dlq,
            max_attempts,
            kafka_options,
        )

    async def _apply(self, event: AllowlistChanged, record: ConsumerRecord[bytes, bytes]) -> None:
        if record.key is not None and record.key.decode("utf-8", "replace") != event.account_id:
            raise MessageRejected(
                f"key {record.key!r} differs from account_id {event.account_id!r}"
            )
        if await self._store.apply_settings(event):
            log.info(
                "allowlist replica updated",
                extra={"account_id": event.account_id, "settings_version": event.version},
            )
        self._cache.offer(event.account_id, event, event.version)

    async def current(self, account_id: str) -> AllowlistChanged | None:
        """The allowlist including every change acknowledged before this call."""
        await self.replica.catch_up(account_id, self._timeout)
        return await self.known(account_id)

    async def known(self, account_id: str) -> AllowlistChanged | None:
        """The allowlist as the replica has it now, without waiting."""
        cached = self._cache.get(account_id)
        if cached is not None:
            return cached
        found = await self._store.settings(account_id)
        if found is not None:
            self._cache.offer(account_id, found, found.version)
        return found


class EndpointRegistry:
    """Endpoint → account, hostname, platform, from ``endpoints.v1`` (recent ones also in memory)."""

    def __init__(
        self,
        store: RedisReplicaStore,
        bootstrap: str,
        topics: Topics,
        dlq: DeadLetterSink,
        catch_up_timeout: float,
        cache_size: int = ENDPOINT_CACHE_SIZE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        kafka_options: KafkaOptions | None = None,
    ) -> None:
        self._store = store
        self._timeout = catch_up_timeout
        # Registrations are versioned by the order the replica applies them: its own writes
        # replace an entry, a read from Redis only fills a missing one (it may be older).
        self._cache: NewestCache[EndpointRecord] = NewestCache(cache_size)
        self._applied = 0
        self.replica = CompactedTopicReplica(
            bootstrap, topics, TopicName.ENDPOINTS, self._apply, dlq, max_attempts, kafka_options
        )

    async def _apply(self, event: EndpointRegistered, record: ConsumerRecord[bytes, bytes]) -> None:
        endpoint = EndpointRecord(
            endpoint_id=event.endpoint_id,
            account_id=event.account_id,
            hostname=event.hostname,
            platform=event.platform,
        )
        previous = await self._store.endpoint(event.endpoint_id)
        # The inventory row first: a crash in between replays this record, and both writes
        # are idempotent. An endpoint that moved account leaves the old account's inventory.
        await self._store.index_endpoint(
            InventoryRow(
                endpoint_id=event.endpoint_id,
                account_id=event.account_id,
                hostname=event.hostname,
                platform=event.platform,
                enrolled_at=event.enrolled_at,
                last_seen=event.last_seen,
            )
        )
        if previous is not None and previous.account_id != event.account_id:
            await self._store.unindex_endpoint(previous.account_id, event.endpoint_id)
        await self._store.put_endpoint(endpoint)
        self._applied += 1
        self._cache.offer(endpoint.endpoint_id, endpoint, self._applied)

    async def get(self, endpoint_id: str) -> EndpointRecord | None:
        """The endpoint; if unknown, first catch up with registrations made before this call."""
        found = await self._lookup(endpoint_id)
        if found is not None:
            return found
        await self.replica.catch_up(endpoint_id, self._timeout)
        return await self._lookup(endpoint_id)

    async def sync(self) -> None:
        """Catch up with every registration made before this call (the inventory's reads)."""
        await self.replica.catch_up_all(self._timeout)

    async def _lookup(self, endpoint_id: str) -> EndpointRecord | None:
        cached = self._cache.get(endpoint_id)
        if cached is not None:
            return cached
        found = await self._store.endpoint(endpoint_id)
        if found is not None:
            self._cache.offer(endpoint_id, found, 0)
        return found
