"""The outbox relay: per shard, publishes committed allowlist changes to Kafka in order, then marks them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import zlib
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    ProducerFenced,
    TransactionalIdAuthorizationFailed,
)

from services.settings.adapters.redis_store import OutboxRecord, RedisAllowlistStore
from services.settings.metrics import SettingsMetrics
from shared.kafka import KafkaOptions
from shared.tasks import cancel_and_wait, raise_if_cancelling
from shared.topics import Topics

log = logging.getLogger(__name__)


# Errors after which this relay's transactional producer is fenced for good: a newer leader
# initialised the same transactional id, so nothing this producer still holds may reach the topic.
FENCED_ERRORS: tuple[type[Exception], ...] = (
    ProducerFenced,
    InvalidProducerEpoch,
    TransactionalIdAuthorizationFailed,
)

ProducerFactory = Callable[[], Any]
# The producer factory of each shard (each with the shard's own transactional id).
ShardProducers = Callable[[int], ProducerFactory]


class LeaseLostError(Exception):
    """The relay's lease expired during a pass: the pass is aborted, its successor publishes."""


class NotVisibleError(Exception):
    """A committed pass did not become visible to read_committed readers in time; it is retried."""


class CommittedVisibility:
    """Waits until the last stable offset of each written partition is past the pass's records.

    ``commit_transaction()`` returns once the coordinator has logged the commit; the commit
    markers reach the partitions a moment later, and until then a read_committed reader's end
    offset (the LSO) stops before the pass. The isolation service's read-your-writes catch-up
    reads up to that end offset, so a write must not answer 2xx (be marked published) before its
    event is visible there.
    """

    def __init__(self, consumer: Any, timeout_s: float = 10.0) -> None:
        self._consumer = consumer  # a group-less read_committed consumer (LazyClient)
        self._timeout_s = timeout_s

    async def warm(self) -> None:
        """Connect now (idempotent), so the first pass does not pay for it."""
        if not self._consumer.started:
            await self._consumer.start()

    async def __call__(self, written: dict[TopicPartition, int]) -> None:
        if not written:
            return
        await self.warm()
        deadline = time.monotonic() + self._timeout_s
        delay = 0.002
        while True:
            ends = await self._consumer.end_offsets(list(written))
            if all(ends.get(tp, -1) > offset for tp, offset in written.items()):
                return
            if time.monotonic() >= deadline:
                raise NotVisibleError(f"committed records not visible after {self._timeout_s} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def stop(self) -> None:
        if self._consumer.started:
            await self._consumer.stop()


def relay_transactional_id(topics: Topics, shard: int) -> str:
    """The transactional id of one outbox shard, the same for every relay instance.

    Stable across instances and restarts on purpose: the shard's new leader initialises it and
    bumps the producer epoch, which aborts the previous leader's open transaction and fences
    every later send or commit of that leader at the broker. One id per shard, so the leaders
    of different shards (on different instances) never fence each other. The settings
    principal may write every id with the ``<prefix>settings-relay`` prefix (shared.kafka_acls).
    """
    return f"{topics.prefix}settings-relay-{shard:02d}"


def make_relay_producer(
    bootstrap: str,
    transactional_id: str,
    *,
    client_id: str,
    linger_ms: int = 5,
    options: KafkaOptions | None = None,
) -> ProducerFactory:
    """A factory of transactional producers (acks=all and idempotence come with transactions)."""

    def build() -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **(options or {}),
            bootstrap_servers=bootstrap,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            transactional_id=transactional_id,
            # A leader that dies mid-pass blocks read_committed readers of its partitions until
            # its successor's initialisation aborts the transaction, or this timeout does.
            transaction_timeout_ms=30_000,
            linger_ms=linger_ms,
            request_timeout_ms=15_000,
            max_request_size=2 * 1024 * 1024,
        )

    return build


class ShardRelay:
    """Publishes one outbox shard while this instance holds the shard's lease.

    Delivery: an entry is removed from the outbox only after Kafka committed its event, so a
    crash at any point republishes it: duplicates of a version are possible, gaps are not.
    Order: one relay at a time per shard (a Redis lease) reads the shard's outbox in commit
    order and publishes each pass as one Kafka transaction; an account is in exactly one shard
    and its key (account_id) pins it to one partition, so each account's versions reach the
    topic in increasing order.

    Fencing: the Redis lease alone cannot stop a leader that paused (GC, a stalled host) past its
    lease and resumes mid-pass: it would publish an older version after the new leader's newer
    one, and compaction would then keep the older one as the account's state. So every leader
    of a shard publishes through a transactional producer with the shard's transactional id: the
    new leader's ``InitProducerId`` aborts the old leader's open transaction and the broker
    refuses the old producer's later sends and commits (ProducerFenced); read_committed
    consumers never see them and the log cleaner drops them.
    """

    def __init__(
        self,
        shard: int,
        store: RedisAllowlistStore,
        producer: ProducerFactory,
        topics: Topics,
        metrics: SettingsMetrics,
        *,
        token: str,
        lease_ms: int,
        batch: int,
        idle_s: float,
        on_progress: Callable[[], None] = lambda: None,
        visibility: CommittedVisibility | None = None,
    ) -> None:
        self.shard = shard
        self._visibility = visibility
        self._store = store
        self._producer_factory = producer
        self._producer: Any = None
        self._topics = topics
        self._metrics = metrics
        self.token = token
        self._lease_ms = lease_ms
        self._batch = batch
        self._idle_s = idle_s
        self._on_progress = on_progress
        self._leader = False
        self._not_leader_since = time.monotonic()
        self._wake = asyncio.Event()

    @property
    def leader(self) -> bool:
        """True while this relay holds the shard's lease (as far as it last checked)."""
        return self._leader

    @leader.setter
    def leader(self, value: bool) -> None:
        if self._leader and not value:
            self._not_leader_since = time.monotonic()
        self._leader = value

    def wake(self) -> None:
        """A change was committed in this shard: start a pass now instead of at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        backoff = 0.2
        while True:
            if not self.leader:
                # A lease missed by a slow renewal is usually taken back at the next check:
                # the producer is kept that long (starting one costs an InitProducerId). Keeping
                # it is safe: if another leader initialised the id meanwhile, it is fenced.
                if time.monotonic() - self._not_leader_since > self._lease_ms / 1000:
                    await self._drop_producer()
                await self._wait_wake()
                continue
            try:
                published = await self.publish_pending()
            except asyncio.CancelledError:
                raise
            except FENCED_ERRORS as exc:
                # Another producer initialised our transactional id. If the lease is still ours
                # that was a stale leader (it aborts itself at its lease check before commit):
                # a fresh producer fences it in turn and the pass is retried. Otherwise the
                # newer leader republishes whatever was not marked.
                self._metrics.publish_failures.inc()
                await self._drop_producer()
                self.leader = await self._still_leader()
                log.warning(
                    "outbox relay fenced (%r); %s",
                    exc,
                    "still the leader, retrying" if self.leader else "no longer the leader",
                    extra={"shard": self.shard},
                )
                continue
            except LeaseLostError as exc:
                log.warning("outbox relay aborted a pass: %s", exc, extra={"shard": self.shard})
                self.leader = False
                await self._drop_producer()
                continue
            except Exception as exc:
                # Kafka or Redis unreachable or refusing: the entries stay in the outbox and are
                # retried.
                self._metrics.publish_failures.inc()
                log.warning(
                    "outbox relay pass failed; retrying in %.1fs: %r",
                    backoff,
                    exc,
                    extra={"shard": self.shard},
                )
                # A transactional producer in an unknown state is not reused: the next pass
                # starts a fresh one, whose initialisation aborts whatever this one left open.
                await self._drop_producer()
                raise_if_cancelling()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.2
            if published == 0:
                await self._wait_wake()

    async def _wait_wake(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self._idle_s)
        raise_if_cancelling()
        self._wake.clear()

    async def publish_pending(self) -> int:
        """One relay pass: publish the shard's oldest pending entries in order; returns how many."""
        records = await self._store.pending(self.shard, self._batch)
        if not records:
            # Warm while idle: a held shard's first write then pays no InitProducerId (start()
            # waits for it) and no connection set-up, only its publish.
            await self._transactional_producer()
            if self._visibility is not None:
                await self._visibility.warm()
            return 0
        await self._publish(records)
        await self.mark_published(records)
        return len(records)

    async def _still_leader(self) -> bool:
        return await self._store.renew_lease(self.shard, self.token, self._lease_ms)

    async def _transactional_producer(self) -> Any:
        if self._producer is None:
            producer = self._producer_factory()
            try:
                await producer.start()
            except BaseException:
                await self._stop_quietly(producer)
                raise
            self._producer = producer
        return self._producer

    async def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await self._stop_quietly(producer)

    async def stop(self) -> None:
        """Stop the shard's producer (its tasks are the owner's to cancel)."""
        await self._drop_producer()

    @staticmethod
    async def _stop_quietly(producer: Any) -> None:
        try:
            await producer.stop()
        except (KafkaError, OSError) as exc:
            log.info("relay producer stopped with %r", exc)

    async def _publish(self, records: list[OutboxRecord]) -> None:
        producer = await self._transactional_producer()
        # The first begin of a producer waits for its InitProducerId: that is where a new leader
        # fences the previous one.
        await producer.begin_transaction()
        try:
            # Handing every send to the producer before awaiting any keeps the pass pipelined;
            # the producer preserves the hand-over order within a partition.
            acks = []
            for record in records:
                key = record.account_id.encode()
                acks.append(
                    await producer.send(self._topics.settings_allowlist, record.event, key=key)
                )
                acks.append(await producer.send(self._topics.audit, record.audit, key=key))
            sent = await asyncio.gather(*acks)
            # The commit is where a stale leader must stop: a successor acquires the lease
            # before it initialises the transactional id, so either the lease check fails here
            # or the successor's initialisation aborts this transaction before it commits.
            if not await self._still_leader():
                raise LeaseLostError(
                    f"shard {self.shard} lease lost before committing {len(records)} entries"
                )
        except BaseException:
            try:
                await producer.abort_transaction()
            except Exception as exc:
                # A fenced or broken producer cannot abort; it is dropped, and the next leader's
                # initialisation (or the transaction timeout) aborts what it left open.
                log.info("relay could not abort its transaction: %r", exc)
            raise
        await producer.commit_transaction()
        if self._visibility is not None:
            written: dict[TopicPartition, int] = {}
            for meta in sent[::2]:  # the allowlist events (every other send is the audit)
                tp = TopicPartition(meta.topic, meta.partition)
                written[tp] = max(written.get(tp, -1), meta.offset)
            await self._visibility(written)
        now_ms = time.time() * 1000
        for record in records:
            self._metrics.publish_latency.observe(max(0.0, now_ms - record.committed_at_ms) / 1000)
        self._metrics.published.inc(len(records))

    async def mark_published(self, records: list[OutboxRecord]) -> None:
        if await self._store.mark_published(self.shard, self.token, records):
            log.debug(
                "published outbox entries",
                extra={
                    "shard": self.shard,
                    "count": len(records),
                    "last_version": records[-1].version,
                },
            )
        else:
            # Another relay took over; it republishes these entries (duplicates, never gaps).
            self.leader = False
            log.warning(
                "relay lost its lease before marking %d entries",
                len(records),
                extra={"shard": self.shard},
            )
        self._on_progress()


class OutboxRelay:
    """Relays every outbox shard whose lease this instance holds, to ``settings.allowlist.v1``.

    One task keeps the leases: it renews the shards held and takes free ones, at most
    ``max_shards`` (so several instances share the shards; a crashed instance's shards are
    taken over once their leases expire). Each shard has its own loop (``ShardRelay``) and its
    own transactional id, so shards publish in parallel and a shard's new leader fences only
    that shard's old one. The same task refreshes the outbox depth (every shard, all instances'
    view) and the count of shards nobody relays.
    """

    def __init__(
        self,
        store: RedisAllowlistStore,
        producers: ShardProducers,
        topics: Topics,
        metrics: SettingsMetrics,
        *,
        lease_ms: int,
        batch: int,
        idle_s: float,
        instance_id: str,
        max_shards: int | None = None,
        visibility: CommittedVisibility | None = None,
    ) -> None:
        self._store = store
        self._visibility = visibility
        self._metrics = metrics
        self._lease_ms = lease_ms
        self._idle_s = idle_s
        self.token = f"{instance_id}:{uuid.uuid4().hex}"
        self.max_shards = store.shards if max_shards is None else min(max_shards, store.shards)
        self.shards = [
            ShardRelay(
                shard,
                store,
                producers(shard),
                topics,
                metrics,
                token=self.token,
                lease_ms=lease_ms,
                batch=batch,
                # The shard loops sleep until woken: by a local commit, by a lease taken, or by
                # the poll below (one pipelined round trip for every shard held).
                idle_s=max(idle_s * 20, 2.0),
                on_progress=self._signal_progress,
                visibility=visibility,
            )
            for shard in range(store.shards)
        ]
        # Instances start their search for free shards at different places, so instances with
        # a bound each take different shards at once instead of racing for the same ones.
        first = zlib.crc32(self.token.encode()) % store.shards
        self._acquire_order = [(first + i) % store.shards for i in range(store.shards)]
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def leader(self) -> bool:
        """True while this instance relays at least one shard."""
        return any(relay.leader for relay in self.shards)

    @property
    def held(self) -> list[int]:
        """The shards whose lease this instance holds."""
        return [relay.shard for relay in self.shards if relay.leader]

    def wake(self, account_id: str | None = None) -> None:
        """A change of ``account_id`` was committed: its shard's relay starts a pass now."""
        if account_id is None:
            for relay in self.shards:
                relay.wake()
        else:
            self.shards[self._store.shard_of(account_id)].wake()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._keep_leases(), name="settings-relay-leases"),
            asyncio.create_task(self._report_depth(), name="settings-relay-depth"),
            asyncio.create_task(self._poll_outboxes(), name="settings-relay-poll"),
        ]
        self._tasks += [
            asyncio.create_task(relay.run(), name=f"settings-relay-{relay.shard:02d}")
            for relay in self.shards
        ]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        held = self.held
        await asyncio.gather(*(relay.stop() for relay in self.shards))
        if self._visibility is not None:
            with contextlib.suppress(KafkaError, OSError):
                await self._visibility.stop()
        for relay in self.shards:
            relay.leader = False
        self._metrics.relay_leader.set(0)
        try:
            await self._store.release_leases(held, self.token)
        except Exception as exc:
            # The leases then simply expire; a successor waits at most one lease.
            log.warning("could not release the relay leases of shards %s: %r", held, exc)

    @property
    def running(self) -> bool:
        """True while the lease, poll and depth tasks and every shard loop run (readiness)."""
        return bool(self._tasks) and all(not t.done() for t in self._tasks)

    async def wait_published(self, account_id: str, version: int, timeout: float) -> bool:
        """True once ``version`` of ``account_id`` is acknowledged by Kafka (by any instance)."""
        deadline = time.monotonic() + timeout
        while True:
            if await self._store.published_version(account_id) >= version:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # Woken by this instance's relays; polls Redis for a shard relayed elsewhere.
            progress = self._progress
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.wait(), min(remaining, 0.05))
            raise_if_cancelling()

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def _keep_leases(self) -> None:
        interval = self._lease_ms / 3000
        while True:
            await self.check_leases()
            await asyncio.sleep(interval)

    async def check_leases(self) -> None:
        """Renew the leases held, then take free shards while below ``max_shards``.

        One pipeline each (one round trip per Redis node, whatever the number of shards), so a
        renewal lands well within the lease even while new connections are slow to open.
        """
        held = self.held
        try:
            renewed = await self._store.renew_leases(held, self.token, self._lease_ms)
        except Exception as exc:
            # Fail closed: a lease that could not be renewed is not ours (the pass's own check
            # before commit decides); it is taken back at once below if it still is.
            log.warning("relay lease renewal failed: %r", exc)
            raise_if_cancelling()
            renewed = [False] * len(held)
        for shard, ok in zip(held, renewed, strict=True):
            if not ok:
                log.warning("outbox relay lost its lease", extra={"shard": shard})
                self.shards[shard].leader = False
                self.shards[shard].wake()
        free = [shard for shard in self._acquire_order if not self.shards[shard].leader]
        room = self.max_shards - len(self.held)
        while room > 0 and free:
            attempt, free = free[:room], free[room:]
            await self._acquire(attempt)
            room = self.max_shards - len(self.held)
        self._metrics.relay_leader.set(len(self.held))

    async def _acquire(self, shards: list[int]) -> None:
        try:
            taken = await self._store.acquire_leases(shards, self.token, self._lease_ms)
        except Exception as exc:
            # Redis client errors (timeouts, connection resets) must not end the relay.
            log.warning("relay lease acquisition failed: %r", exc)
            raise_if_cancelling()
            return
        for shard, ok in zip(shards, taken, strict=True):
            if ok:
                log.info("outbox relay leads shard %d", shard, extra={"token": self.token})
                self.shards[shard].leader = True
                self.shards[shard].wake()

    async def _poll_outboxes(self) -> None:
        # Changes committed by other instances wake nobody here: every ``idle_s`` the outboxes
        # of the shards held are read in one pipeline and the loops of non-empty ones woken.
        while True:
            held = self.held
            try:
                depths = await self._store.shard_depths(held)
            except Exception as exc:
                log.info("could not poll the outboxes: %r", exc)
                raise_if_cancelling()
                depths = [1] * len(held)  # let each loop look (and report) for itself
            for shard, depth in zip(held, depths, strict=True):
                if depth:
                    self.shards[shard].wake()
            await asyncio.sleep(self._idle_s)

    async def _report_depth(self) -> None:
        # Its own task, so reading every shard never delays a lease renewal.
        while True:
            await self.refresh_gauges()
            await asyncio.sleep(max(self._lease_ms / 1000, 1.0))

    async def refresh_gauges(self) -> None:
        """Outbox depth over every shard, and how many shards nobody relays."""
        try:
            depth = await self._store.outbox_depth()
            holders = await self._store.lease_holders()
        except Exception as exc:
            log.info("could not read the outbox depth: %r", exc)
            raise_if_cancelling()
            return
        self._metrics.outbox_depth.set(depth)
        self._metrics.unrelayed_shards.set(sum(1 for holder in holders if holder is None))
