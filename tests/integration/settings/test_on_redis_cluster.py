"""The settings service on a 3-master Redis Cluster: instances share the outbox shards' relays."""

from __future__ import annotations

import asyncio

from shared.infra.redis_cluster import LocalRedisCluster
from shared.messages import AllowlistChanged
from shared.topics import Topics
from tests.helpers import read_topic, wait_for
from tests.integration.settings.conftest import SOC, SettingsApp, SettingsFactory, running_app
from tests.integration.settings.test_outbox_relay import assert_in_order_without_gaps

SHARDS = 4


def accounts_per_shard(app: SettingsApp) -> list[str]:
    """Two accounts in each shard."""
    store = app.app.state.store
    found: dict[int, list[str]] = {s: [] for s in range(SHARDS)}
    i = 0
    while any(len(v) < 2 for v in found.values()):
        account = f"acct-rc-{i}"
        if len(found[store.shard_of(account)]) < 2:
            found[store.shard_of(account)].append(account)
        i += 1
    return [a for shard in sorted(found) for a in found[shard]]


async def write_round(apps: list[SettingsApp], accounts: list[str], i: int) -> None:
    responses = await asyncio.gather(
        *(
            apps[n % len(apps)].add(account, f"RMM {i}", f"10.11.{i}.{n + 1}")
            for n, account in enumerate(accounts)
        )
    )
    assert all(r.status_code == 201 for r in responses), [r.text for r in responses]


async def held_apart(one: SettingsApp, two: SettingsApp) -> bool:
    held = [set(one.app.state.relay.held), set(two.app.state.relay.held)]
    return len(held[0]) == len(held[1]) == 2 and not held[0] & held[1]


async def test_two_instances_relay_two_shards_each_and_a_third_takes_over_on_redis_cluster(
    make_settings: SettingsFactory,
    redis_cluster: LocalRedisCluster,
    topics: Topics,
    kafka_bootstrap: str,
) -> None:
    settings = make_settings(
        redis_url=redis_cluster.url, settings_shards=SHARDS, relay_max_shards=2
    )
    async with running_app(settings) as one:
        accounts = accounts_per_shard(one)
        async with running_app(settings) as two:
            for app in (one, two):
                assert (await app.client.get("/ready")).status_code == 200
            # Each instance holds at most 2 of the 4 shard leases: they split them.
            await wait_for(lambda: held_apart(one, two), timeout=30, message="shards split")
            for i in range(3):
                await write_round([one, two], accounts, i)
            metrics = (await one.client.get("/metrics")).text
            assert "hostiso_settings_relay_leader 2.0" in metrics
        # The second instance stopped (its leases released): its shards wait for a relay...
        async with running_app(settings) as three:
            # ...until a third instance takes them, while the first keeps its own.
            await wait_for(lambda: held_apart(one, three), timeout=30, message="takeover")
            for i in range(3, 5):
                await write_round([one, three], accounts, i)
            stored = {
                a: (await one.client.get(one.url(a), headers=SOC)).json()["version"]
                for a in accounts
            }
    assert set(stored.values()) == {5}
    events: list[AllowlistChanged] = await read_topic(
        kafka_bootstrap, topics, topics.settings_allowlist, expect=5 * len(accounts)
    )
    newest = assert_in_order_without_gaps(events)
    assert {a: newest[a].version for a in accounts} == stored
