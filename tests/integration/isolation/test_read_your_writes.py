"""Guarantee 2: an allowlist change acknowledged before an isolation request is in its snapshot."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.messages import Actor, EnforcePolicy, IsolateEndpoint
from shared.topics import TopicName
from tests.helpers import kafka_admin_options, topic_partitions, wait_for
from tests.integration.isolation.conftest import Harness

ACCOUNTS = 10
ROUNDS = 20  # ACCOUNTS x ROUNDS = 200 change-then-isolate pairs


def address(round_: int, account: int) -> str:
    return f"203.0.113.{1 + round_ * ACCOUNTS + account}"


async def test_acknowledged_allowlist_change_is_in_the_next_snapshot_200_times(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    accounts = [f"acct-ryw-{j}" for j in range(ACCOUNTS)]
    await asyncio.gather(
        *(h.register(f"ryw-{r}-{j}", a) for r in range(ROUNDS) for j, a in enumerate(accounts))
    )
    # A replica under load lags behind the topic: slow it down so that a snapshot taken
    # without catching up would miss the change (this test fails if the catch-up is removed).
    store = h.app.state.replica_store
    apply_settings = store.apply_settings

    async def lagging_apply(event: object) -> bool:
        await asyncio.sleep(0.02)
        return bool(await apply_settings(event))

    monkeypatch.setattr(store, "apply_settings", lagging_apply)
    reader = AIOKafkaConsumer(
        **kafka_admin_options(), bootstrap_servers=h.bootstrap, enable_auto_commit=False
    )
    await reader.start()
    topic = h.topics.enforcer_commands
    tps = [TopicPartition(topic, p) for p in await topic_partitions(h.bootstrap, topic)]
    reader.assign(tps)
    await reader.seek_to_beginning(*tps)
    policies: dict[str, EnforcePolicy] = {}

    async def drain(expect: int) -> bool:
        for records in (await reader.getmany(timeout_ms=50)).values():
            for record in records:
                command = EnforcePolicy.model_validate_json(record.value)
                policies[command.policy.endpoint_id] = command
        return len(policies) >= expect

    stale: list[tuple[str, int, int]] = []
    try:
        for r in range(ROUNDS):
            # Each round changes every account's allowlist and, as soon as the change is
            # acknowledged (acks=all, as the settings service does), isolates one of its
            # endpoints; the next change of that account waits for the snapshot, so the
            # snapshot must be exactly the acknowledged version, not an older or newer one.
            expected: dict[str, tuple[int, str]] = {}
            for j, account in enumerate(accounts):
                event = await h.set_allowlist(account, [address(r, j)])
                endpoint = f"ryw-{r}-{j}"
                expected[endpoint] = (event.version, address(r, j))
                if j % 2 == 0:
                    response = await h.http.post(
                        f"/v1/endpoints/{endpoint}/isolation",
                        json={"mode": "standard"},
                        headers=h.partner(account),
                    )
                    assert response.status_code == 202, response.text
                else:
                    partner = Actor(sub="p", role="partner", account_id=account)
                    await h.send(
                        h.topics(TopicName.ISOLATION_REQUESTS),
                        endpoint,
                        IsolateEndpoint(
                            endpoint_id=endpoint, mode="standard", requested_by=partner
                        ),
                    )
            await wait_for(lambda r=r: drain((r + 1) * ACCOUNTS), timeout=30, message=f"round {r}")
            for endpoint, (version, addr) in expected.items():
                policy = policies[endpoint].policy
                if policy.settings_version != version or [
                    p.address for p in policy.allowed_outbound
                ] != [addr]:
                    stale.append((endpoint, policy.settings_version, version))
    finally:
        await reader.stop()
    assert len(policies) == ACCOUNTS * ROUNDS
    assert stale == [], f"{len(stale)} snapshots missed an acknowledged change: {stale[:5]}"
