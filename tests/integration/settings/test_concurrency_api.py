"""Optimistic concurrency: same If-Match → exactly one winner; several instances keep order."""

from __future__ import annotations

import asyncio
import uuid

from shared.messages import AllowlistChanged
from shared.topics import Topics
from tests.helpers import read_topic
from tests.integration.settings.conftest import SOC, SettingsApp, SettingsFactory, running_app


async def test_two_writers_with_the_same_if_match_exactly_one_wins(
    module_app: SettingsApp,
) -> None:
    for round_ in range(5):
        account = f"acct-{uuid.uuid4().hex[:8]}"
        assert (await module_app.add(account, "RMM", "10.3.3.3")).status_code == 201
        headers = {**SOC, "If-Match": '"1"'}
        first, second = await asyncio.gather(
            module_app.client.post(
                module_app.url(account, "/entries"),
                json={"name": "A", "address": "10.3.3.4"},
                headers=headers,
            ),
            module_app.client.patch(
                module_app.url(account), json={"enabled": True}, headers=headers
            ),
        )
        statuses = sorted([first.status_code, second.status_code])
        assert statuses in ([200, 412], [201, 412]), (round_, first.text, second.text)
        stored = (await module_app.client.get(module_app.url(account), headers=SOC)).json()
        assert stored["version"] == 2


async def test_concurrent_writers_without_if_match_all_apply_in_sequence(
    module_app: SettingsApp,
) -> None:
    account = f"acct-{uuid.uuid4().hex[:8]}"
    responses = await asyncio.gather(
        *(module_app.add(account, f"RMM {i}", f"10.4.4.{i + 1}") for i in range(8))
    )
    assert all(r.status_code == 201 for r in responses)
    assert sorted(r.json()["version"] for r in responses) == list(range(1, 9))


async def test_two_instances_never_relay_the_same_shard_and_keep_each_accounts_order(
    make_settings: SettingsFactory, topics: Topics, kafka_bootstrap: str
) -> None:
    settings = make_settings()
    async with running_app(settings) as one, running_app(settings) as two:
        accounts = ["acct-a", "acct-b"]
        writes = []
        for i in range(6):
            for app in (one, two):
                for account in accounts:
                    writes.append(
                        app.add(account, f"{app is one} {i}", f"10.5.{i}.{len(writes) + 1}")
                    )
        responses = await asyncio.gather(*writes)
        assert all(r.status_code == 201 for r in responses), [r.text for r in responses]
        held = [set(one.app.state.relay.held), set(two.app.state.relay.held)]
        # One relay per shard: no shard is held by both; the accounts' shards are held.
        assert not held[0] & held[1]
        store = one.app.state.store
        assert {store.shard_of(a) for a in accounts} <= held[0] | held[1]
    events: list[AllowlistChanged] = await read_topic(
        kafka_bootstrap, topics, topics.settings_allowlist, expect=24
    )
    for account in accounts:
        versions = [e.version for e in events if e.account_id == account]
        assert versions == list(range(1, 13))
