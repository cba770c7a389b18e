"""A shard's relay leader that paused past its lease cannot publish after its successor (Kafka fencing).

The Redis lease alone let a paused old leader publish an older version after the new leader's
newer one; compaction then kept the older one as the account's state. Every leader of a shard
now publishes through the shard's transactional id, and checks its lease before each commit.
Runs on a single Redis and on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from services.settings.adapters.outbox_relay import (
    FENCED_ERRORS,
    LeaseLostError,
    OutboxRecord,
    ShardRelay,
    make_relay_producer,
    relay_transactional_id,
)
from services.settings.adapters.redis_store import RedisAllowlistStore
from shared.kafka import kafka_client_options
from shared.messages import AllowlistChanged
from shared.topics import Topics
from tests.helpers import read_topic, wait_for
from tests.integration.settings.conftest import SettingsApp, SettingsFactory, running_app
from tests.integration.settings.test_outbox_relay import crash_relay

ACCOUNT = "acct-fence"
OTHER = "acct-fence-other"
LEASE_MS = 60_000


def relay_on(app: SettingsApp, name: str, shard: int) -> ShardRelay:
    """A relay of one shard of the app's outbox, driven step by step by the test."""
    settings = app.settings
    return ShardRelay(
        shard,
        app.app.state.store,
        make_relay_producer(
            settings.kafka_bootstrap,
            relay_transactional_id(app.topics, shard),
            client_id=name,
            options=kafka_client_options(settings),
        ),
        app.topics,
        app.app.state.relay._metrics,
        token=f"{name}-token",
        lease_ms=LEASE_MS,
        batch=100,
        idle_s=0.05,
    )


async def take_lease(app: SettingsApp, relay: ShardRelay) -> None:
    """``relay`` becomes the shard's leader, as if the previous one's lease had expired."""
    store: RedisAllowlistStore = app.app.state.store
    await store._redis.delete(store.lease_key(relay.shard))
    assert await store.acquire_lease(relay.shard, relay.token, LEASE_MS)
    relay.leader = True


async def versions_on_topic(
    kafka_bootstrap: str, topics: Topics, account: str, expect_last: int
) -> list[int]:
    async def read() -> list[int] | None:
        events: list[AllowlistChanged] = await read_topic(
            kafka_bootstrap, topics, topics.settings_allowlist
        )
        versions = [e.version for e in events if e.account_id == account]
        return versions if versions and versions[-1] >= expect_last else None

    return await wait_for(read, timeout=20, message=f"{account} v{expect_last} on the topic")


async def write(app: SettingsApp, i: int, account: str = ACCOUNT) -> None:
    response = await app.add(account, f"RMM {i}", f"10.9.{i}.1")
    # The app's own relay is crashed: the change is saved and waits in the outbox.
    assert response.status_code == 503, response.text


def other_shard_account(store: RedisAllowlistStore) -> str:
    """An account in another shard than ``ACCOUNT``."""
    shard = store.shard_of(ACCOUNT)
    return next(f"{OTHER}-{i}" for i in range(1000) if store.shard_of(f"{OTHER}-{i}") != shard)


async def test_paused_leader_of_a_shard_cannot_publish_an_older_version_after_its_successor(
    make_settings: SettingsFactory, topics: Topics, kafka_bootstrap: str, any_redis_url: str
) -> None:
    async with running_app(make_settings(redis_url=any_redis_url, publish_wait_s=0.2)) as app:
        await wait_for(lambda: app.app.state.relay.leader, message="relay leader")
        crash_relay(app.app.state.relay)
        await app.app.state.relay.stop()
        store: RedisAllowlistStore = app.app.state.store
        shard = store.shard_of(ACCOUNT)
        other_account = other_shard_account(store)
        old, new = relay_on(app, "old-leader", shard), relay_on(app, "new-leader", shard)
        # The leader of another shard is untouched by this shard's fencing.
        neighbour = relay_on(app, "neighbour", store.shard_of(other_account))
        try:
            await take_lease(app, old)
            await take_lease(app, neighbour)
            await write(app, 1)
            assert await old.publish_pending() == 1
            # The old leader reads v2 from the outbox, then pauses past its lease.
            await write(app, 2)
            stale: list[OutboxRecord] = await store.pending(shard, 100)
            assert [r.version for r in stale] == [2]
            await take_lease(app, new)
            await write(app, 3)
            assert await new.publish_pending() == 2
            assert await versions_on_topic(kafka_bootstrap, topics, ACCOUNT, 3) == [1, 2, 3]
            # The old leader wakes up and publishes what it read: refused at the broker.
            try:
                await old._publish(stale)
            except FENCED_ERRORS:
                pass
            else:
                raise AssertionError("a fenced leader's pass went through")
            # A stale leader that builds a fresh producer fences the new one for a moment, but
            # its lease check before commit aborts its own transaction.
            late = relay_on(app, "late-leader", shard)
            try:
                await late._publish(stale)
            except LeaseLostError:
                pass
            else:
                raise AssertionError("a leader without the lease committed a pass")
            finally:
                await late.stop()
            # Meanwhile the other shard's leader was never fenced: its pass goes through.
            await write(app, 5, account=other_account)
            assert await neighbour.publish_pending() == 1
            assert await versions_on_topic(kafka_bootstrap, topics, other_account, 1) == [1]
            # The real leader recovers from being fenced and goes on publishing.
            await write(app, 4)
            assert await _run_until_published(new, app, version=4)
            versions = await versions_on_topic(kafka_bootstrap, topics, ACCOUNT, 4)
            assert versions == [1, 2, 3, 4], versions
        finally:
            await old.stop()
            await new.stop()
            await neighbour.stop()


async def _run_until_published(relay: ShardRelay, app: SettingsApp, version: int) -> bool:
    task = asyncio.create_task(relay.run())
    try:
        return await wait_for(
            lambda: _published(app, version), timeout=20, message=f"v{version} marked published"
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _published(app: SettingsApp, version: int) -> bool:
    published: Any = await app.app.state.store.published_version(ACCOUNT)
    return int(published) >= version
