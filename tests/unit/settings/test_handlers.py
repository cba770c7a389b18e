"""Use cases over in-memory fakes: compare-and-set, refusals audited, read-your-writes deadline."""

from __future__ import annotations

from typing import Any

import pytest

from services.settings.domain import Allowlist, Change, DuplicateAddressError, StaleVersionError
from services.settings.handlers import AccountAccessDeniedError, NotPublishedError, SettingsHandlers
from shared.messages import Actor, AllowlistChanged, AuditRecorded

SOC = Actor(sub="soc", role="soc")
PARTNER = Actor(sub="alice", role="partner", account_id="acct-1")


class MemoryStore:
    """A dict-backed store whose commit is a compare-and-set, like the Lua script."""

    def __init__(self) -> None:
        self.states: dict[str, Allowlist] = {}
        self.outbox: list[AllowlistChanged] = []
        self.history_records: dict[str, list[dict[str, Any]]] = {}
        self.interloper: Allowlist | None = None

    async def load(self, account_id: str) -> Allowlist:
        return self.states.get(account_id, Allowlist(account_id=account_id))

    async def commit(self, change: Change, event: AllowlistChanged, audit: AuditRecorded) -> bool:
        if self.interloper is not None:
            # Another writer commits between our read and our compare-and-set.
            self.states[change.after.account_id], self.interloper = self.interloper, None
        current = await self.load(change.after.account_id)
        if current.version != change.before.version:
            return False
        self.states[change.after.account_id] = change.after
        self.outbox.append(event)
        self.history_records.setdefault(change.after.account_id, []).append({"a": audit.action})
        return True

    async def history(
        self, account_id: str, *, limit: int, before_version: int | None = None
    ) -> list[dict[str, Any]]:
        newest_first = list(reversed(self.history_records.get(account_id, [])))
        return newest_first[:limit]


class InstantPublication:
    def __init__(self, reachable: bool = True) -> None:
        self.reachable = reachable
        self.woken: list[str] = []

    def wake(self, account_id: str) -> None:
        self.woken.append(account_id)

    async def wait_published(self, account_id: str, version: int, timeout: float) -> bool:
        return self.reachable


class MemoryAudit:
    def __init__(self) -> None:
        self.records: list[AuditRecorded] = []

    async def record(self, audit: AuditRecorded) -> None:
        self.records.append(audit)


def make(reachable: bool = True) -> tuple[SettingsHandlers, MemoryStore, MemoryAudit]:
    store, audit = MemoryStore(), MemoryAudit()
    handlers = SettingsHandlers(
        store=store,
        publication=InstantPublication(reachable),
        audit=audit,
        max_entries=100,
        publish_wait_s=0.1,
    )
    return handlers, store, audit


async def test_a_change_commits_one_event_with_the_full_state() -> None:
    handlers, store, _ = make()
    await handlers.add_entry(SOC, "acct-1", "RMM", "10.0.0.5", None)
    after = await handlers.set_enabled(SOC, "acct-1", True, 1)
    assert after.version == 2
    assert [e.version for e in store.outbox] == [1, 2]
    assert store.outbox[-1].enabled and store.outbox[-1].entries[0].address == "10.0.0.5"


async def test_lost_race_with_if_match_is_stale_and_audited() -> None:
    handlers, store, audit = make()
    await handlers.set_enabled(SOC, "acct-1", True, None)
    store.interloper = Allowlist(account_id="acct-1", enabled=False, version=2)
    with pytest.raises(StaleVersionError):
        await handlers.add_entry(SOC, "acct-1", "RMM", "10.0.0.5", 1)
    assert audit.records[-1].outcome == "rejected"
    assert "If-Match" in audit.records[-1].detail


async def test_lost_race_without_if_match_is_retried_on_fresh_state() -> None:
    handlers, store, _ = make()
    store.interloper = Allowlist(account_id="acct-1", enabled=True, version=5)
    after, _ = await handlers.add_entry(SOC, "acct-1", "RMM", "10.0.0.5", None)
    assert after.version == 6 and after.enabled


async def test_partner_of_another_account_is_denied_and_audited() -> None:
    handlers, _, audit = make()
    await handlers.authorize(PARTNER, "acct-1", "allowlist.read")
    with pytest.raises(AccountAccessDeniedError):
        await handlers.authorize(PARTNER, "acct-2", "allowlist.read")
    assert audit.records[-1].outcome == "denied"
    assert audit.records[-1].account_id == "acct-2"


async def test_rejected_entries_are_audited_and_not_stored() -> None:
    handlers, store, audit = make()
    await handlers.add_entry(SOC, "acct-1", "RMM", "10.0.0.5", None)
    with pytest.raises(DuplicateAddressError):
        await handlers.add_entry(SOC, "acct-1", "Again", "10.0.0.5", None)
    assert audit.records[-1].outcome == "rejected"
    assert len(store.outbox) == 1


async def test_unpublished_change_is_saved_but_answered_503() -> None:
    handlers, store, _ = make(reachable=False)
    with pytest.raises(NotPublishedError) as caught:
        await handlers.set_enabled(SOC, "acct-1", True, None)
    assert caught.value.version == 1
    assert "will be published when Kafka is reachable" in caught.value.message
    assert (await store.load("acct-1")).enabled
    # A repeated no-op write still refuses to claim the state is in force.
    with pytest.raises(NotPublishedError):
        await handlers.set_enabled(SOC, "acct-1", True, None)
