"""The outbox relay survives crashes: every version arrives, in order; the topic rebuilds the state."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.settings.adapters.outbox_relay import OutboxRelay
from shared.messages import AllowlistChanged
from shared.topics import Topics
from tests.helpers import read_topic, wait_for
from tests.integration.settings.conftest import SOC, SettingsApp, SettingsFactory, running_app

ACCOUNTS = ["acct-r1", "acct-r2", "acct-r3"]


def crash_relay(relay: OutboxRelay) -> None:
    """Kill the relay as a crash would: its tasks end, the lease is left to expire."""
    for task in relay._tasks:
        task.cancel()


def assert_in_order_without_gaps(events: list[AllowlistChanged]) -> dict[str, AllowlistChanged]:
    """Per account: new versions appear as 1, 2, 3...; a repeat is an exact duplicate."""
    newest: dict[str, AllowlistChanged] = {}
    seen: dict[tuple[str, int], AllowlistChanged] = {}
    for event in events:
        current = newest.get(event.account_id)
        if current is None or event.version > current.version:
            expected = 1 if current is None else current.version + 1
            assert event.version == expected, (
                f"gap or reordering at {event.account_id} v{event.version}"
            )
            newest[event.account_id] = event
            seen[(event.account_id, event.version)] = event
        else:
            assert seen[(event.account_id, event.version)] == event, "a repeat must be a duplicate"
    return newest


async def assert_topic_rebuilds_state(
    app: SettingsApp, kafka_bootstrap: str, topics: Topics, expect: int
) -> list[AllowlistChanged]:
    events: list[AllowlistChanged] = await read_topic(
        kafka_bootstrap, topics, topics.settings_allowlist, expect=expect
    )
    newest = assert_in_order_without_gaps(events)
    for account in ACCOUNTS:
        stored = (await app.client.get(app.url(account), headers=SOC)).json()
        rebuilt = newest[account]
        assert rebuilt.version == stored["version"]
        assert rebuilt.enabled == stored["enabled"]
        assert [e.model_dump(mode="json") for e in rebuilt.entries] == stored["entries"]
        # Compaction keeps the last record per key: it must be the newest version.
        assert [e for e in events if e.account_id == account][-1].version == stored["version"]
    return events


async def _writes(app: SettingsApp, rounds: int) -> list[Any]:
    responses = []
    for i in range(rounds):
        for account in ACCOUNTS:
            responses.append(await app.add(account, f"RMM {i}", f"10.6.{i}.1"))
            if i == 1:
                responses.append(
                    await app.client.patch(app.url(account), json={"enabled": True}, headers=SOC)
                )
    return responses


async def test_relay_killed_before_publishing_publishes_everything_after_restart(
    make_settings: SettingsFactory, topics: Topics, kafka_bootstrap: str
) -> None:
    settings = make_settings(publish_wait_s=0.3)
    async with running_app(settings) as first:
        await wait_for(lambda: first.app.state.relay.leader, message="relay leader")
        crash_relay(first.app.state.relay)
        responses = await _writes(first, 3)
        assert {r.status_code for r in responses} == {503}
        body = responses[0].json()
        assert "will be published when Kafka is reachable" in body["detail"]
        assert "not yet in force for new isolations" in body["detail"]
        assert body["version"] == 1
        assert await read_topic(kafka_bootstrap, topics, topics.settings_allowlist) == []
        async with running_app(make_settings()) as restarted:
            events = await assert_topic_rebuilds_state(restarted, kafka_bootstrap, topics, 12)
            assert len(events) == 12
            after = await restarted.add("acct-r1", "after restart", "10.6.9.9")
            assert after.status_code == 201


async def test_relay_killed_after_publishing_but_before_marking_republishes_in_order(
    make_settings: SettingsFactory, topics: Topics, kafka_bootstrap: str
) -> None:
    settings = make_settings(publish_wait_s=10)
    async with running_app(settings) as first:
        relay: OutboxRelay = first.app.state.relay
        await wait_for(lambda: relay.leader, message="relay leader")
        crashed = asyncio.Event()

        async def crash_before_marking(records: Any) -> None:
            crashed.set()
            crash_relay(relay)
            raise asyncio.CancelledError

        for shard in relay.shards:
            shard.mark_published = crash_before_marking  # type: ignore[method-assign]
        writes = asyncio.create_task(_writes(first, 3))
        await asyncio.wait_for(crashed.wait(), 10)
        async with running_app(settings) as restarted:
            responses = await writes
            assert {r.status_code for r in responses} <= {200, 201}, [r.text for r in responses]
            events = await assert_topic_rebuilds_state(restarted, kafka_bootstrap, topics, 13)
            assert len(events) > 12, "the crashed pass was published twice"


@pytest.mark.parametrize("rounds", [2])
async def test_outbox_is_empty_once_everything_is_published(
    settings_app: SettingsApp, topics: Topics, kafka_bootstrap: str, rounds: int
) -> None:
    responses = await _writes(settings_app, rounds)
    assert all(r.status_code in (200, 201) for r in responses)
    assert await settings_app.app.state.store.outbox_depth() == 0
    metrics = (await settings_app.client.get("/metrics")).text
    assert "hostiso_settings_outbox_depth" in metrics
    assert 'route="/v1/accounts/{account_id}/tooling-allowlist/entries",status="201"' in metrics
