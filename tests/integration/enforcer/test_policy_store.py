"""The desired-policy store and the wake-ups on a single Redis and on a 3-master Redis Cluster.

Every script runs on the cluster here: one touching two slots would be refused (CROSSSLOT).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from services.enforcer.adapters.redis_store import (
    TAG,
    EnforcerKeys,
    RedisAgentStore,
    RedisPolicyStore,
)
from services.enforcer.adapters.wakeups import RedisPolicyWakeups
from services.enforcer.domain import NORMAL_LANE, PRIORITY_LANE, CreateOutcome, StoreOutcome
from services.enforcer.handlers import AgentRecord, PolicyToStore
from shared.redis import Keys, bucket_of
from tests.integration.enforcer.conftest import Backend, policy_command

pytestmark = pytest.mark.integration


def item(endpoint_id: str, sequence: int, account_id: str = "acct-1") -> PolicyToStore:
    policy = policy_command(endpoint_id, sequence, account_id=account_id).policy
    return PolicyToStore(policy=policy, signed_json=f"signed-{endpoint_id}-{sequence}".encode())


def agent(agent_id: str, token: str, account_id: str = "acct-1") -> AgentRecord:
    return AgentRecord(agent_id, account_id, "h", "linux", token, "2026-01-01T00:00:00+00:00")


@pytest.fixture
def stores(backend: Backend, redis_prefix: str) -> tuple[RedisPolicyStore, RedisAgentStore]:
    keys = Keys(redis_prefix)
    return RedisPolicyStore(backend.client, keys), RedisAgentStore(backend.client, keys)


@pytest.fixture
async def wakeups(backend: Backend, redis_prefix: str) -> AsyncIterator[RedisPolicyWakeups]:
    store = RedisPolicyStore(backend.client, Keys(redis_prefix))
    hub = RedisPolicyWakeups(backend.url, store.keys.wake_channels(), ca_file=backend.ca_file)
    await hub.start(timeout=30)
    try:
        yield hub
    finally:
        await hub.stop()


async def test_store_keeps_the_newest_sequence_of_the_enrolled_account(
    stores: tuple[RedisPolicyStore, RedisAgentStore],
) -> None:
    policies, agents = stores
    assert await agents.create(agent("ep-f", "t")) is CreateOutcome.CREATED
    outcomes = await policies.store_if_newer([item("ep-f", 2)], PRIORITY_LANE)
    assert outcomes == [StoreOutcome.STORED]
    late = await policies.store_if_newer(
        [item("ep-f", 1), item("ep-f", 2), item("ep-f", 3, "acct-2")], NORMAL_LANE
    )
    assert late == [StoreOutcome.STALE, StoreOutcome.STALE, StoreOutcome.WRONG_ACCOUNT]
    held = await policies.held("ep-f")
    assert held is not None and (held.sequence, held.signed_json) == (2, b"signed-ep-f-2")


async def test_a_poll_checks_token_and_cursor_and_reads_the_policy_only_if_newer(
    stores: tuple[RedisPolicyStore, RedisAgentStore],
) -> None:
    policies, agents = stores
    await agents.create(agent("ep-p", "digest-p"))
    await policies.store_if_newer([item("ep-p", 4)], NORMAL_LANE)
    refused = await policies.poll("ep-p", "digest-other", 0)
    assert refused.identity is None and refused.newer is None
    idle = await policies.poll("ep-p", "digest-p", 4)
    assert idle.identity is not None and idle.identity.account_id == "acct-1"
    assert idle.newer is None
    delivering = await policies.poll("ep-p", "digest-p", 3)
    assert delivering.newer is not None
    assert (delivering.newer.sequence, delivering.newer.signed_json) == (4, b"signed-ep-p-4")
    nothing_yet = await policies.poll("ep-p-none", "digest-p", 0)
    assert nothing_yet.identity is None


async def test_delivery_counts_gather_every_bucket(
    stores: tuple[RedisPolicyStore, RedisAgentStore],
) -> None:
    policies, _ = stores
    endpoints = [f"ep-d-{i:02d}" for i in range(30)]
    assert len({bucket_of(e) for e in endpoints}) > 10
    await policies.store_if_newer([item(e, 1) for e in endpoints], NORMAL_LANE)
    for endpoint in endpoints[:7]:
        await policies.record_delivery(endpoint, 1, f"pol-{endpoint[:8]}-1", "applied")
    for endpoint in endpoints[7:10]:
        await policies.record_delivery(endpoint, 1, f"pol-{endpoint[:8]}-1", "failed")
    desired = await policies.record_delivery(endpoints[10], 9, "pol-x", "applied")
    assert desired is not None and (desired.sequence, desired.policy_id) == (1, "pol-ep-d-10-1")
    await policies.record_delivery(endpoints[11], 1, "pol-other", "failed")  # not its policy
    assert await policies.record_delivery("ep-never-stored", 1, "pol-x", "failed") is None
    assert await policies.delivery_counts() == {"pending": 20, "applied": 7, "failed": 3}
    # A newer policy makes an applied endpoint pending again.
    await policies.store_if_newer([item(endpoints[0], 2)], PRIORITY_LANE)
    assert await policies.delivery_counts() == {"pending": 21, "applied": 6, "failed": 3}


async def test_a_store_wakes_the_waiters_of_its_endpoint_in_every_bucket(
    backend: Backend,
    stores: tuple[RedisPolicyStore, RedisAgentStore],
    wakeups: RedisPolicyWakeups,
) -> None:
    policies, _ = stores
    endpoints = [f"ep-w-{i:02d}" for i in range(40)]
    assert len({bucket_of(e) for e in endpoints}) > 16
    if backend.name == "cluster":
        assert wakeups.shards == 3, "one subscriber link per master"
    with contextlib.ExitStack() as stack:
        waiters = {e: stack.enter_context(wakeups.waiter(e)) for e in endpoints}
        for waiter in waiters.values():
            waiter.arm()
        bystander = waiters.pop("ep-w-00")
        await policies.store_if_newer([item(e, 1) for e in endpoints[1:]], NORMAL_LANE)
        woken = await asyncio.wait_for(asyncio.gather(*(w.wait(20) for w in waiters.values())), 25)
        assert all(woken)
        assert not await bystander.wait(0.2), "only the stored endpoints are woken"
    assert wakeups.waiting_count == 0


def test_every_bucket_has_its_own_wake_channel(redis_prefix: str) -> None:
    keys = EnforcerKeys(Keys(redis_prefix))
    channels = keys.wake_channels()
    assert len(set(channels)) == 64 and all(TAG in c for c in channels)
    assert keys.wake("ep-1") in channels
    assert keys.wake("ep-1").endswith(keys.agent("ep-1").split(":")[-2])
