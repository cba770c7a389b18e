"""Revoking a compromised entry: one commit removes it, records why, and names it in the event."""

from __future__ import annotations

import pytest

from services.settings.domain import EntryNotFoundError, EntryRejectedError
from services.settings.handlers import SettingsHandlers
from shared.messages import Actor, AllowlistEntry
from tests.unit.settings.test_handlers import InstantPublication, MemoryAudit, MemoryStore

PARTNER = Actor(sub="alice", role="partner", account_id="acct-1")


class CountingIsolation:
    def __init__(self, answer: int | None) -> None:
        self.answer = answer
        self.asked: list[tuple[str, str, str]] = []

    async def affected(
        self, account_id: str, revocation_id: str, entry: AllowlistEntry
    ) -> int | None:
        self.asked.append((account_id, revocation_id, entry.address))
        return self.answer


def make(answer: int | None = 3) -> tuple[SettingsHandlers, MemoryStore, CountingIsolation]:
    store, counter = MemoryStore(), CountingIsolation(answer)
    ids = iter(f"id-{i}" for i in range(100))
    handlers = SettingsHandlers(
        store=store,
        publication=InstantPublication(),
        audit=MemoryAudit(),
        max_entries=100,
        publish_wait_s=0.1,
        new_id=lambda: next(ids),
        revocation_counter=counter,
    )
    return handlers, store, counter


async def test_revoke_removes_the_entry_and_its_event_names_it_with_the_reason() -> None:
    handlers, store, counter = make()
    _, added = await handlers.add_entry(PARTNER, "acct-1", "RMM", "203.0.113.10", None)
    await handlers.add_entry(PARTNER, "acct-1", "Relay", "203.0.113.20", None)
    assert added is not None and added.entry is not None
    after, change, endpoints = await handlers.revoke_entry(
        PARTNER, "acct-1", added.entry.id, "  RMM server compromised  "
    )
    assert [e.address for e in after.entries] == ["203.0.113.20"]
    assert change.action == "allowlist.entry.revoke"
    event = store.outbox[-1]
    assert event.version == 3 and [e.address for e in event.entries] == ["203.0.113.20"]
    (revoked,) = event.revoked
    assert revoked.entry.address == "203.0.113.10"
    assert revoked.reason == "RMM server compromised"
    assert store.history_records["acct-1"][-1] == {"a": "allowlist.entry.revoke"}
    # Counted after the commit, for the revocation the event carries.
    assert endpoints == 3
    assert counter.asked == [("acct-1", revoked.revocation_id, "203.0.113.10")]


async def test_an_ordinary_removal_revokes_nothing() -> None:
    handlers, store, _ = make()
    _, added = await handlers.add_entry(PARTNER, "acct-1", "RMM", "203.0.113.10", None)
    assert added is not None and added.entry is not None
    await handlers.remove_entry(PARTNER, "acct-1", added.entry.id, None)
    assert store.outbox[-1].revoked == ()


async def test_revoke_without_a_count_still_happens() -> None:
    handlers, store, _ = make(answer=None)
    _, added = await handlers.add_entry(PARTNER, "acct-1", "RMM", "203.0.113.10", None)
    assert added is not None and added.entry is not None
    after, _, endpoints = await handlers.revoke_entry(PARTNER, "acct-1", added.entry.id, "pwned")
    assert endpoints is None and after.entries == ()
    assert store.outbox[-1].revoked


@pytest.mark.parametrize(
    ("reason", "rule"), [("", "required"), ("   ", "required"), ("x" * 1001, "too_long")]
)
async def test_revoke_needs_a_reason(reason: str, rule: str) -> None:
    handlers, store, counter = make()
    _, added = await handlers.add_entry(PARTNER, "acct-1", "RMM", "203.0.113.10", None)
    assert added is not None and added.entry is not None
    with pytest.raises(EntryRejectedError) as caught:
        await handlers.revoke_entry(PARTNER, "acct-1", added.entry.id, reason)
    assert (caught.value.field, caught.value.rule) == ("reason", rule)
    assert len(store.outbox) == 1 and counter.asked == []


async def test_revoking_an_unknown_entry_is_404_and_changes_nothing() -> None:
    handlers, store, _ = make()
    with pytest.raises(EntryNotFoundError):
        await handlers.revoke_entry(PARTNER, "acct-1", "nope", "compromised")
    assert store.outbox == []
