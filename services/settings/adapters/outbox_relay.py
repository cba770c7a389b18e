"""The outbox relay: publishes committed allowlist changes to Kafka in commit order, then marks them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
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


class LeaseLostError(Exception):
    """The relay's lease expired during a pass: the pass is aborted, its successor publishes."""


def relay_transactional_id(topics: Topics) -> str:
    """One transactional id for every relay instance of a topic namespace.

    Stable across instances and restarts on purpose: the leader that initialises it bumps the
    producer epoch, which aborts the previous leader's open transaction and fences every later
    send or commit of that leader at the broker.
    """
    return f"{topics.prefix}settings-relay"


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


class OutboxRelay:
    """Publishes the Redis outbox to ``settings.allowlist.v1`` (and ``audit.v1``).

    Delivery: an entry is removed from the outbox only after Kafka committed its event, so a
    crash at any point republishes it: duplicates of a version are possible, gaps are not.
    Order: one relay at a time (a Redis lease) reads the outbox in commit order and publishes each
    pass as one Kafka transaction; the key (account_id) pins an account to one partition, so each
    account's versions reach the topic in increasing order.

    Fencing: the Redis lease alone cannot stop a leader that paused (GC, a stalled host) past its
    lease and resumes mid-pass: it would publish an older version after the new leader's newer
    one, and compaction would then keep the older one as the account's state. So every leader
    publishes through a transactional producer with the same transactional id: the new leader's
    ``InitProducerId`` aborts the old leader's open transaction and the broker refuses the old
    producer's later sends and commits (ProducerFenced); read_committed consumers never see them
    and the log cleaner drops them.
    """

    def __init__(
        self,
        store: RedisAllowlistStore,
        producer: ProducerFactory,
        topics: Topics,
        metrics: SettingsMetrics,
        *,
        lease_ms: int,
        batch: int,
        idle_s: float,
        instance_id: str,
    ) -> None:
        self._store = store
        self._producer_factory = producer
        self._producer: Any = None
        self._topics = topics
        self._metrics = metrics
        self._lease_ms = lease_ms
        self._batch = batch
        self._idle_s = idle_s
        self.token = f"{instance_id}:{uuid.uuid4().hex}"
        self.leader = False
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def wake(self) -> None:
        """A change was committed: start a pass now instead of at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._keep_lease(), name="settings-relay-lease"),
            asyncio.create_task(self._run(), name="settings-relay"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        await self._drop_producer()
        if self.leader:
            self.leader = False
            self._metrics.relay_leader.set(0)
            try:
                await self._store.release_lease(self.token)
            except Exception as exc:
                # The lease then simply expires; a successor waits at most one lease.
                log.warning("could not release the relay lease: %r", exc)

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks)

    async def wait_published(self, account_id: str, version: int, timeout: float) -> bool:
        """True once ``version`` of ``account_id`` is acknowledged by Kafka (by any instance)."""
        deadline = time.monotonic() + timeout
        while True:
            if await self._store.published_version(account_id) >= version:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # Woken by this instance's relay; polls Redis for a relay leading elsewhere.
            progress = self._progress
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.wait(), min(remaining, 0.05))
            raise_if_cancelling()

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def _keep_lease(self) -> None:
        interval = self._lease_ms / 3000
        while True:
            try:
                if self.leader:
                    self.leader = await self._store.renew_lease(self.token, self._lease_ms)
                    if not self.leader:
                        log.warning("outbox relay lost its lease", extra={"token": self.token})
                        self._wake.set()
                else:
                    self.leader = await self._store.acquire_lease(self.token, self._lease_ms)
                    if self.leader:
                        log.info("outbox relay is the leader", extra={"token": self.token})
                        self._wake.set()
            except Exception as exc:
                # Redis client errors (timeouts, connection resets) must not end the relay.
                log.warning("relay lease check failed: %r", exc)
                self.leader = False
                raise_if_cancelling()
            self._metrics.relay_leader.set(1 if self.leader else 0)
            await asyncio.sleep(interval)

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            if not self.leader:
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
                )
                self._metrics.relay_leader.set(1 if self.leader else 0)
                continue
            except LeaseLostError as exc:
                log.warning("outbox relay aborted a pass: %s", exc)
                self.leader = False
                self._metrics.relay_leader.set(0)
                await self._drop_producer()
                continue
            except Exception as exc:
                # Kafka unreachable or refusing: the entries stay in the outbox and are retried.
                self._metrics.publish_failures.inc()
                log.warning("outbox relay pass failed; retrying in %.1fs: %r", backoff, exc)
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
        """One relay pass: publish the oldest pending entries in order; returns how many."""
        records = await self._store.pending(self._batch)
        self._metrics.outbox_depth.set(await self._store.outbox_depth())
        if not records:
            return 0
        await self._publish(records)
        await self.mark_published(records)
        return len(records)

    async def _still_leader(self) -> bool:
        return await self._store.renew_lease(self.token, self._lease_ms)

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
            await asyncio.gather(*acks)
            # The commit is where a stale leader must stop: a successor acquires the lease
            # before it initialises the transactional id, so either the lease check fails here
            # or the successor's initialisation aborts this transaction before it commits.
            if not await self._still_leader():
                raise LeaseLostError(f"lease lost before committing {len(records)} entries")
        except BaseException:
            try:
                await producer.abort_transaction()
            except Exception as exc:
                # A fenced or broken producer cannot abort; it is dropped, and the next leader's
                # initialisation (or the transaction timeout) aborts what it left open.
                log.info("relay could not abort its transaction: %r", exc)
            raise
        await producer.commit_transaction()
        now_ms = time.time() * 1000
        for record in records:
            self._metrics.publish_latency.observe(max(0.0, now_ms - record.committed_at_ms) / 1000)
        self._metrics.published.inc(len(records))

    async def mark_published(self, records: list[OutboxRecord]) -> None:
        if await self._store.mark_published(self.token, records):
            log.debug(
                "published outbox entries",
                extra={"count": len(records), "last_version": records[-1].version},
            )
        else:
            # Another relay took over; it republishes these entries (duplicates, never gaps).
            self.leader = False
            log.warning("relay lost its lease before marking %d entries", len(records))
        self._signal_progress()
