"""The relay's lease keeping over a fake store: bounded shards per instance, fail closed, takeover."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from services.settings.adapters.outbox_relay import OutboxRelay
from services.settings.metrics import SettingsMetrics
from shared.topics import Topics


class LeaseTable:
    """Shard leases as Redis holds them (no expiry: the tests expire them by hand)."""

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self.holders: dict[int, str] = {}
        self.failing = False

    def shard_of(self, account_id: str) -> int:
        return sum(account_id.encode()) % self.shards

    async def acquire_leases(self, shards: list[int], token: str, lease_ms: int) -> list[bool]:
        if self.failing:
            raise ConnectionError("redis unreachable")
        taken = []
        for shard in shards:
            if self.holders.get(shard, token) == token:
                self.holders[shard] = token
                taken.append(True)
            else:
                taken.append(False)
        return taken

    async def renew_leases(self, shards: list[int], token: str, lease_ms: int) -> list[bool]:
        if self.failing:
            raise ConnectionError("redis unreachable")
        return [self.holders.get(shard) == token for shard in shards]

    async def release_leases(self, shards: list[int], token: str) -> None:
        for shard in shards:
            if self.holders.get(shard) == token:
                del self.holders[shard]


def relay(table: LeaseTable, name: str, max_shards: int | None = None) -> OutboxRelay:
    store: Any = table
    return OutboxRelay(
        store,
        lambda shard: lambda: None,
        Topics("t."),
        SettingsMetrics(CollectorRegistry()),
        lease_ms=1000,
        batch=10,
        idle_s=0.1,
        instance_id=name,
        max_shards=max_shards,
    )


async def test_instances_with_a_bound_split_the_shards_without_overlap() -> None:
    table = LeaseTable(shards=8)
    one, two = relay(table, "one", max_shards=4), relay(table, "two", max_shards=4)
    await one.check_leases()
    await two.check_leases()
    assert len(one.held) == len(two.held) == 4
    assert set(one.held) | set(two.held) == set(range(8))
    assert {table.holders[s] for s in one.held} == {one.token}


async def test_without_a_bound_one_instance_relays_every_shard_and_the_other_stands_by() -> None:
    table = LeaseTable(shards=8)
    one, two = relay(table, "one"), relay(table, "two")
    await one.check_leases()
    await two.check_leases()
    assert one.held == list(range(8)) and two.held == []


async def test_a_dead_instances_shards_are_taken_over_when_its_leases_expire() -> None:
    table = LeaseTable(shards=4)
    one, two = relay(table, "one"), relay(table, "two")
    await one.check_leases()
    await two.check_leases()
    assert two.held == []
    table.holders.clear()  # "one" died: its leases expired
    await two.check_leases()
    assert two.held == [0, 1, 2, 3]
    await one.check_leases()  # "one" comes back from a pause: it learns it lost them all
    assert one.held == []


async def test_a_renewal_that_fails_counts_as_lost_and_the_lease_is_taken_back() -> None:
    table = LeaseTable(shards=4)
    one = relay(table, "one")
    await one.check_leases()
    table.failing = True
    await one.check_leases()
    assert one.held == []  # fail closed: a lease it cannot confirm is not relayed
    table.failing = False
    await one.check_leases()
    assert one.held == [0, 1, 2, 3]  # still its own in Redis: taken back at once


async def test_stop_releases_the_leases_it_holds_only() -> None:
    table = LeaseTable(shards=4)
    one, two = relay(table, "one", max_shards=2), relay(table, "two", max_shards=2)
    await one.check_leases()
    await two.check_leases()
    await one.stop()
    assert set(table.holders) == set(two.held) and one.held == []


def test_a_commit_wakes_only_its_accounts_shard() -> None:
    table = LeaseTable(shards=4)
    one = relay(table, "one")
    one.wake("acct-1")
    woken = [r.shard for r in one.shards if r._wake.is_set()]
    assert woken == [table.shard_of("acct-1")]
