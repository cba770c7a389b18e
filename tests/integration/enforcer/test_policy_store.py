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


def _same_bucket(prefix: str, count: int) -> list[str]:
    """``count`` endpoint ids of one bucket (one slot), for the per-bucket store script."""
    by_bucket: dict[int, list[str]] = {}
    for i in range(10_000):
        endpoint = f"{prefix}-{i}"
        members = by_bucket.setdefault(bucket_of(endpoint), [])
        members.append(endpoint)
        if len(members) == count:
            return members
    raise AssertionError("no bucket filled")


async def test_a_batch_stores_each_endpoint_of_a_bucket_as_one_by_one_stores_would(
    backend: Backend, redis_prefix: str
) -> None:
    # The same batch against two fresh namespaces: once as one batch (one script per bucket),
    # once policy by policy; outcomes, held policies and delivery sets must be the same.
    async def run(keys: Keys, one_by_one: bool) -> tuple[list[StoreOutcome], list[object], object]:
        policies = RedisPolicyStore(backend.client, keys)
        agents = RedisAgentStore(backend.client, keys)
        a, b, c, d, e = _same_bucket("ep-g", 5)
        await agents.create(agent(b, "t"))
        await agents.create(agent(c, "t", account_id="acct-2"))
        await policies.store_if_newer([item(d, 5)], NORMAL_LANE)
        await policies.record_delivery(d, 5, f"pol-{d[:8]}-5", "applied")
        others = [f"ep-o-{i}" for i in range(6)]
        batch = [
            item(a, 1),  # not enrolled: stored
            item(others[0], 1),
            item(b, 2),  # enrolled in acct-1: stored
            item(c, 3),  # enrolled in acct-2: refused
            item(others[1], 1),
            item(d, 4),  # older than the held 5: stale
            item(e, 7),
            item(e, 8),  # the same endpoint twice: both stored, in order
            *(item(o, 2) for o in others[2:]),
        ]
        if one_by_one:
            outcomes = [(await policies.store_if_newer([i], NORMAL_LANE))[0] for i in batch]
        else:
            outcomes = await policies.store_if_newer(batch, NORMAL_LANE)
        held = []
        for endpoint in (a, b, c, d, e, *others):
            policy = await policies.held(endpoint)
            held.append(None if policy is None else (policy.sequence, policy.signed_json))
        return outcomes, held, await policies.delivery_counts()

    batched = await run(Keys(redis_prefix + "batch:"), one_by_one=False)
    single = await run(Keys(redis_prefix + "single:"), one_by_one=True)
    assert batched == single
    outcomes = batched[0]
    ok, stale, wrong = StoreOutcome.STORED, StoreOutcome.STALE, StoreOutcome.WRONG_ACCOUNT
    assert outcomes == [ok, ok, ok, wrong, ok, stale, ok, ok, ok, ok, ok, ok]
    assert batched[2] == {"pending": 9, "applied": 1, "failed": 0}


async def test_one_wake_message_per_bucket_wakes_every_endpoint_stored_in_it(
    stores: tuple[RedisPolicyStore, RedisAgentStore], wakeups: RedisPolicyWakeups
) -> None:
    policies, agents = stores
    same = _same_bucket("ep-m", 4)
    await agents.create(agent(same[3], "t", account_id="acct-2"))
    with contextlib.ExitStack() as stack:
        waiters = {e: stack.enter_context(wakeups.waiter(e)) for e in same}
        for waiter in waiters.values():
            waiter.arm()
        received = wakeups.wakeups_received
        outcomes = await policies.store_if_newer([item(e, 1) for e in same], NORMAL_LANE)
        assert outcomes[-1] is StoreOutcome.WRONG_ACCOUNT
        woken = await asyncio.wait_for(asyncio.gather(*(waiters[e].wait(20) for e in same[:3])), 25)
        assert all(woken)
        assert wakeups.wakeups_received == received + 1, "one message for the bucket"
        assert not await waiters[same[3]].wait(0.2), "a refused policy wakes nobody"
        # A batch with nothing stored in a bucket publishes nothing there.
        for waiter in waiters.values():
            waiter.arm()
        assert (
            await policies.store_if_newer([item(e, 1) for e in same[:3]], NORMAL_LANE)
            == [StoreOutcome.STALE] * 3
        )
        assert not any(await asyncio.gather(*(waiters[e].wait(0.3) for e in same[:3]))), (
            "stale policies wake nobody"
        )
        assert wakeups.wakeups_received == received + 1
