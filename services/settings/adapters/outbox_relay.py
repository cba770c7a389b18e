"""The outbox relay: publishes committed allowlist changes to Kafka in commit order, then marks them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from services.settings.adapters.redis_store import OutboxRecord, RedisAllowlistStore
from services.settings.metrics import SettingsMetrics
from shared.tasks import cancel_and_wait, raise_if_cancelling
from shared.topics import Topics

log = logging.getLogger(__name__)


class OutboxRelay:
    """Publishes the Redis outbox to ``settings.allowlist.v1`` (and ``audit.v1``).

    Delivery: an entry is removed from the outbox only after Kafka acknowledged its event
    (acks=all, idempotent producer), so a crash at any point republishes it: duplicates of a
    version are possible, gaps are not. Order: one relay at a time (a Redis lease) reads the
    outbox in commit order and hands each pass to the producer in that order; the idempotent
    producer keeps per-partition order, and the key (account_id) pins an account to one
    partition, so each account's versions reach the topic in increasing order.
    """

    def __init__(
        self,
        store: RedisAllowlistStore,
        producer: Any,
        topics: Topics,
        metrics: SettingsMetrics,
        *,
        lease_ms: int,
        batch: int,
        idle_s: float,
        instance_id: str,
    ) -> None:
        self._store = store
        self._producer = producer
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
                await self._wait_wake()
                continue
            try:
                published = await self.publish_pending()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Kafka unreachable or refusing: the entries stay in the outbox and are retried.
                self._metrics.publish_failures.inc()
                log.warning("outbox relay pass failed; retrying in %.1fs: %r", backoff, exc)
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

    async def _publish(self, records: list[OutboxRecord]) -> None:
        # Handing every send to the producer before awaiting any keeps the pass pipelined; the
        # producer preserves the hand-over order within a partition.
        acks = []
        for record in records:
            key = record.account_id.encode()
            acks.append(
                await self._producer.send(self._topics.settings_allowlist, record.event, key=key)
            )
            acks.append(await self._producer.send(self._topics.audit, record.audit, key=key))
        await asyncio.gather(*acks)
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
