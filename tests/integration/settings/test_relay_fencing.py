"""A relay leader that paused past its lease cannot publish after its successor (Kafka fencing).

The Redis lease alone let a paused old leader publish an older version after the new leader's
newer one; compaction then kept the older one as the account's state. Every leader now
publishes through the same transactional id, and checks its lease before each commit.
"""

from __future__ import annotations

from typing import Any

from services.settings.adapters.outbox_relay import (
    FENCED_ERRORS,
    LeaseLostError,
    OutboxRecord,
    OutboxRelay,
    make_relay_producer,
    relay_transactional_id,
)
from shared.kafka import kafka_client_options
from shared.messages import AllowlistChanged
from shared.topics import Topics
from tests.helpers import read_topic, wait_for
from tests.integration.settings.conftest import SettingsApp, SettingsFactory, running_app
from tests.integration.settings.test_outbox_relay import crash_relay

ACCOUNT = "acct-fence"
LEASE_MS = 60_000


def relay_on(app: SettingsApp, name: str) -> OutboxRelay:
    """A relay on the app's outbox, driven step by step by the test (no background tasks)."""
    settings = app.settings
    return OutboxRelay(
        app.app.state.store,
        make_relay_producer(
            settings.kafka_bootstrap,
            relay_transactional_id(app.topics),
            client_id=name,
            options=kafka_client_options(settings),
        ),
        app.topics,
        app.app.state.relay._metrics,
        lease_ms=LEASE_MS,
        batch=100,
        idle_s=0.05,
        instance_id=name,
    )


async def take_lease(app: SettingsApp, relay: OutboxRelay) -> None:
    store = app.app.state.store
    await store._redis.delete(store.lease_key)
    assert await store.acquire_lease(relay.token, LEASE_MS)
    relay.leader = True


async def versions_on_topic(kafka_bootstrap: str, topics: Topics, expect_last: int) -> list[int]:
    async def read() -> list[int] | None:
        events: list[AllowlistChanged] = await read_topic(
            kafka_bootstrap, topics, topics.settings_allowlist
        )
        versions = [e.version for e in events if e.account_id == ACCOUNT]
        return versions if versions and versions[-1] >= expect_last else None

    return await wait_for(read, timeout=20, message=f"version {expect_last} on the topic")


async def write(app: SettingsApp, i: int) -> None:
    response = await app.add(ACCOUNT, f"RMM {i}", f"10.9.{i}.1")
    # The app's own relay is crashed: the change is saved and waits in the outbox.
    assert response.status_code == 503, response.text


async def test_paused_leader_cannot_publish_an_older_version_after_its_successor(
    make_settings: SettingsFactory, topics: Topics, kafka_bootstrap: str
) -> None:
    async with running_app(make_settings(publish_wait_s=0.2)) as app:
        await wait_for(lambda: app.app.state.relay.leader, message="relay leader")
        crash_relay(app.app.state.relay)
        await app.app.state.relay.stop()
        old, new = relay_on(app, "old-leader"), relay_on(app, "new-leader")
        try:
            await take_lease(app, old)
            await write(app, 1)
            assert await old.publish_pending() == 1
            # The old leader reads v2 from the outbox, then pauses past its lease.
            await write(app, 2)
            stale: list[OutboxRecord] = await app.app.state.store.pending(100)
            assert [r.version for r in stale] == [2]
            await take_lease(app, new)
            await write(app, 3)
            assert await new.publish_pending() == 2
            assert await versions_on_topic(kafka_bootstrap, topics, 3) == [1, 2, 3]
            # The old leader wakes up and publishes what it read: refused at the broker.
            try:
                await old._publish(stale)
            except FENCED_ERRORS:
                pass
            else:
                raise AssertionError("a fenced leader's pass went through")
            # A stale leader that builds a fresh producer fences the new one for a moment, but
            # its lease check before commit aborts its own transaction.
            late = relay_on(app, "late-leader")
            try:
                await late._publish(stale)
            except LeaseLostError:
                pass
            else:
                raise AssertionError("a leader without the lease committed a pass")
            finally:
                await late.stop()
            # The real leader recovers from being fenced and goes on publishing.
            await write(app, 4)
            new_run = await _run_until_published(new, app, version=4)
            assert new_run
            versions = await versions_on_topic(kafka_bootstrap, topics, 4)
            assert versions == [1, 2, 3, 4], versions
        finally:
            await old.stop()
            await new.stop()


async def _run_until_published(relay: OutboxRelay, app: SettingsApp, version: int) -> bool:
    await relay.start()
    try:
        return await wait_for(
            lambda: _published(app, version), timeout=20, message=f"v{version} marked published"
        )
    finally:
        await relay.stop()


async def _published(app: SettingsApp, version: int) -> bool:
    published: Any = await app.app.state.store.published_version(ACCOUNT)
    return int(published) >= version
