"""The settings store's contract, run on a single Redis and on a real 3-master Redis Cluster.

Every script (commit, mark, lease) must stay in one shard's hash slot: on Redis Cluster a
script spanning slots fails with CROSSSLOT, so each test here would fail on the cluster run.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from services.settings import domain
from services.settings.adapters.redis_store import RedisAllowlistStore
from shared.infra.redis_cluster import LocalRedisCluster
from shared.messages import Actor, AllowlistChanged, AuditRecorded
from shared.redis import Keys, RedisClient, is_cluster_url, make_redis_client
from tests.helpers import SECURITY, wait_for

SHARDS = 4
ACTOR = Actor(sub="soc@platform.example", role="soc")


def client_for(url: str) -> RedisClient:
    """A client as the settings service connects: its own ACL user on the secure single Redis."""
    if not is_cluster_url(url) and SECURITY.redis_url_for is not None:
        url = SECURITY.redis_url_for("settings")
    return make_redis_client(url, ca_file=SECURITY.redis_ca_file)


@pytest.fixture
async def store(any_redis_url: str, redis_prefix: str) -> AsyncIterator[RedisAllowlistStore]:
    client = client_for(any_redis_url)
    keys = Keys(redis_prefix)
    try:
        yield RedisAllowlistStore(client, lambda *p: keys("settings", *p), shards=SHARDS)
    finally:
        await client.aclose()


def accounts_in_every_shard(store: RedisAllowlistStore, per_shard: int = 2) -> list[str]:
    found: dict[int, list[str]] = {s: [] for s in range(store.shards)}
    i = 0
    while any(len(v) < per_shard for v in found.values()):
        account = f"acct-{i}"
        if len(found[store.shard_of(account)]) < per_shard:
            found[store.shard_of(account)].append(account)
        i += 1
    return [a for shard in sorted(found) for a in found[shard]]


async def toggle(store: RedisAllowlistStore, account: str) -> bool:
    current = await store.load(account)
    change = domain.set_enabled(current, not current.enabled, datetime.now(UTC))
    assert change is not None
    return await commit(store, change)


async def commit(store: RedisAllowlistStore, change: domain.Change) -> bool:
    event = AllowlistChanged(
        account_id=change.after.account_id,
        enabled=change.after.enabled,
        entries=change.after.entries,
        version=change.after.version,
        updated_at=datetime.now(UTC),
        changed_by=ACTOR,
    )
    audit = AuditRecorded(service="settings", action=change.action, outcome="ok", actor=ACTOR)
    return await store.commit(change, event, audit)


async def test_commit_is_a_compare_and_set_that_writes_nothing_when_stale(
    store: RedisAllowlistStore,
) -> None:
    account = f"acct-{uuid.uuid4().hex[:8]}"
    fresh = await store.load(account)
    first = domain.set_enabled(fresh, True, datetime.now(UTC))
    assert first is not None
    assert await commit(store, first)
    # A second writer that read the same version loses and leaves no trace.
    assert not await commit(store, first)
    stored = await store.load(account)
    assert stored.version == 1 and stored.enabled
    assert [r.version for r in await store.pending(store.shard_of(account), 10)] == [1]
    assert await store.history_size(account) == 1


async def test_each_shard_outbox_holds_only_its_accounts_in_commit_order(
    store: RedisAllowlistStore,
) -> None:
    accounts = accounts_in_every_shard(store)
    for _ in range(3):
        for account in accounts:
            assert await toggle(store, account)
    for shard in range(store.shards):
        records = await store.pending(shard, 100)
        mine = [a for a in accounts if store.shard_of(a) == shard]
        assert {r.account_id for r in records} == set(mine)
        # Commit order: round by round, so each account's versions rise 1, 2, 3.
        assert [(r.account_id, r.version) for r in records] == [
            (a, v) for v in (1, 2, 3) for a in mine
        ]
    assert await store.outbox_depth() == 3 * len(accounts)
    assert sum(await store.shard_depths(list(range(store.shards)))) == 3 * len(accounts)


async def test_marking_needs_the_shards_lease_and_only_raises_published_versions(
    store: RedisAllowlistStore,
) -> None:
    accounts = accounts_in_every_shard(store)
    for account in accounts:
        assert await toggle(store, account)
        assert await toggle(store, account)
    for shard in range(store.shards):
        records = await store.pending(shard, 100)
        # Without the lease (another relay leads): nothing marked, nothing removed.
        assert not await store.mark_published(shard, "not-the-leader", records)
        assert len(await store.pending(shard, 100)) == len(records)
        assert await store.acquire_lease(shard, "leader", 10_000)
        newest, older = records[-1:], records[:-1]
        assert await store.mark_published(shard, "leader", newest)
        # A late mark of an older version never lowers the published version.
        assert await store.mark_published(shard, "leader", older)
        assert await store.pending(shard, 100) == []
        for account in (a for a in accounts if store.shard_of(a) == shard):
            assert await store.published_version(account) == 2
    assert await store.outbox_depth() == 0


async def test_mark_refuses_accounts_of_another_shard(store: RedisAllowlistStore) -> None:
    accounts = accounts_in_every_shard(store, per_shard=1)
    with pytest.raises(ValueError, match="not in shard"):
        store.mark_keys(0, accounts)


async def test_shard_leases_are_independent_reentrant_and_released(
    store: RedisAllowlistStore,
) -> None:
    assert await store.acquire_leases([0, 1], "a", 10_000) == [True, True]
    assert await store.acquire_leases([0, 1, 2], "b", 10_000) == [False, False, True]
    # The holder takes its own lease again (after losing track of it); others cannot renew it.
    assert await store.acquire_lease(0, "a", 10_000)
    assert await store.renew_leases([0, 1, 2], "a", 10_000) == [True, True, False]
    holders = await store.lease_holders()
    assert holders[:3] == ["a", "a", "b"] and holders[3] is None
    await store.release_lease(0, "a")
    await store.release_leases([1, 2], "a")  # shard 2 is not its lease: no effect

    async def free_now() -> bool:
        return (await store.lease_holders())[:2] == [None, None]

    await wait_for(free_now, timeout=5, message="released lease expires")
    assert (await store.lease_holders())[2] == "b"
    assert await store.acquire_lease(0, "b", 10_000)


async def test_history_is_paged_newest_first_and_trimmed(
    any_redis_url: str, redis_prefix: str
) -> None:
    client = client_for(any_redis_url)
    keys = Keys(redis_prefix)
    store = RedisAllowlistStore(
        client, lambda *p: keys("settings", *p), history_max_records=3, shards=SHARDS
    )
    try:
        account = f"acct-{uuid.uuid4().hex[:8]}"
        for _ in range(5):
            assert await toggle(store, account)
        assert await store.history_size(account) == 3
        assert [r["version"] for r in await store.history(account, limit=10)] == [5, 4, 3]
        page = await store.history(account, limit=10, before_version=5)
        assert [r["version"] for r in page] == [4, 3]
    finally:
        await client.aclose()


def keys_per_node(cluster: LocalRedisCluster, prefix: str) -> list[int]:
    counts = []
    for port in cluster.ports:
        out = subprocess.run(
            ["redis-cli", "-p", str(port), "--scan", "--pattern", f"{prefix}*"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        counts.append(len(out.split()))
    return counts


async def test_scripts_never_cross_slots_and_shards_spread_over_every_master(
    redis_cluster: LocalRedisCluster, redis_prefix: str
) -> None:
    # 16 shards (the default) of several accounts each: the commit and the (multi-account) mark
    # scripts run on Redis Cluster without CROSSSLOT, and the shards live on all 3 masters.
    client = make_redis_client(redis_cluster.url)
    keys = Keys(redis_prefix)
    store = RedisAllowlistStore(client, lambda *p: keys("settings", *p))
    try:
        accounts = accounts_in_every_shard(store, per_shard=3)
        for account in accounts:
            assert await toggle(store, account)
        taken = await store.acquire_leases(list(range(store.shards)), "leader", 10_000)
        assert all(taken)
        for shard in range(store.shards):
            records = await store.pending(shard, 100)
            assert len({r.account_id for r in records}) == 3
            assert await store.mark_published(shard, "leader", records)
        assert await store.outbox_depth() == 0
        assert all([await store.published_version(a) == 1 for a in accounts])
        assert all(count > 0 for count in keys_per_node(redis_cluster, redis_prefix))
    finally:
        await client.aclose()
