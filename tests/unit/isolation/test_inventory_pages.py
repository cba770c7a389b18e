"""Inventory pages and the timeline fold, on in-memory ports (the Redis adapter: integration)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.isolation.domain import EndpointIsolation, EndpointRecord
from services.isolation.handlers import AccountForbiddenError
from services.isolation.inventory import (
    InvalidCursorError,
    InventoryRow,
    InventoryService,
    decode_cursor,
    encode_cursor,
    sort_key,
)
from services.isolation.timeline import TimelineEvent, fold_timeline
from shared.messages import Actor, AuditRecorded

pytestmark = pytest.mark.unit

SOC = Actor(sub="soc", role="soc")
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


class Index:
    def __init__(self, rows: list[InventoryRow]) -> None:
        self.rows = sorted(rows, key=lambda r: r.sort_key)
        self.scans = 0

    async def scan(self, account_id: str, after: str | None, count: int) -> list[InventoryRow]:
        self.scans += 1
        rows = [r for r in self.rows if r.account_id == account_id]
        return [r for r in rows if after is None or r.sort_key > after][:count]


class States:
    def __init__(self, isolated: set[str]) -> None:
        self.isolated = isolated
        self.events: list[TimelineEvent] = []

    async def load_many(self, endpoint_ids: list[str]) -> list[EndpointIsolation]:
        return [
            EndpointIsolation(endpoint_id=e, account_id="a", state="isolated", mode="strict")
            for e in endpoint_ids
            if e in self.isolated
        ]

    async def timeline(self, endpoint_id: str, count: int) -> list[TimelineEvent]:
        return self.events[:count]


class Registry:
    synced = 0

    async def get(self, endpoint_id: str) -> EndpointRecord | None:
        return EndpointRecord(
            endpoint_id=endpoint_id, account_id="a", hostname="h", platform="linux"
        )

    async def sync(self) -> None:
        self.synced += 1


class Audit:
    def __init__(self) -> None:
        self.records: list[AuditRecorded] = []

    async def send_audit(self, audit: AuditRecorded) -> None:
        self.records.append(audit)


def rows(n: int) -> list[InventoryRow]:
    return [
        InventoryRow(
            endpoint_id=f"ep-{i}", account_id="a", hostname=f"Host-{i:02d}", platform="linux"
        )
        for i in range(n)
    ]


def service(
    n: int, isolated: set[str] | None = None, **limits: int
) -> tuple[InventoryService, Index, Audit]:
    index = Index(rows(n))
    audit = Audit()
    return (
        InventoryService(index, States(isolated or set()), Registry(), audit, **limits),
        index,
        audit,
    )


async def test_a_full_last_page_has_no_cursor_when_the_index_ended_with_it() -> None:
    inventory, _, _ = service(4, chunk=10)
    first = await inventory.endpoints("a", SOC, limit=2)
    assert [i.endpoint_id for i in first.items] == ["ep-0", "ep-1"]
    second = await inventory.endpoints("a", SOC, limit=2, cursor=first.next_cursor)
    assert [i.endpoint_id for i in second.items] == ["ep-2", "ep-3"]
    assert second.next_cursor is None


async def test_a_narrow_filter_stops_at_the_scan_budget_with_a_cursor_to_go_on() -> None:
    inventory, index, _ = service(50, isolated={"ep-45"}, max_scan=20, chunk=10)
    page = await inventory.endpoints("a", SOC, state="isolated", limit=5)
    assert page.items == [] and page.next_cursor is not None
    assert index.scans == 2
    pages = [page]
    while pages[-1].next_cursor:
        pages.append(
            await inventory.endpoints("a", SOC, state="isolated", cursor=pages[-1].next_cursor)
        )
    assert [i.endpoint_id for p in pages for i in p.items] == ["ep-45"]
    assert [(i.state, i.mode) for p in pages for i in p.items] == [("isolated", "strict")]


async def test_hostname_filter_is_case_insensitive() -> None:
    inventory, _, _ = service(12)
    page = await inventory.endpoints("a", SOC, text="host-1")
    assert [i.hostname for i in page.items] == ["Host-10", "Host-11"]


async def test_a_partner_of_another_account_is_refused_and_audited() -> None:
    inventory, index, audit = service(3)
    partner = Actor(sub="mallory", role="partner", account_id="b")
    with pytest.raises(AccountForbiddenError):
        await inventory.endpoints("a", partner)
    assert index.scans == 0
    assert [(r.action, r.outcome) for r in audit.records] == [("isolation.read", "denied")]


def test_cursors_round_trip_and_foreign_ones_are_refused() -> None:
    key = sort_key("Web-01", "ep-1")
    assert decode_cursor(encode_cursor(key)) == key
    for bad in ("", "%%%", encode_cursor("no-separator")[:-2] + "zz", "djE6bm8tc2VwYXJhdG9y"):
        with pytest.raises(InvalidCursorError, match="cursor"):
            decode_cursor(bad)


def test_a_nul_in_a_hostname_cannot_break_the_index_order() -> None:
    assert sort_key("web\x00evil", "ep-1") == "webevil\x00ep-1"


def event(kind: str, sequence: int, minutes: int, detail: str = "") -> TimelineEvent:
    return TimelineEvent(
        kind=kind,  # type: ignore[arg-type]
        at=T0 + timedelta(minutes=minutes),
        sequence=sequence,
        policy_id=f"p-{sequence}",
        mode="standard",
        issued_by="alice",
        detail=detail,
    )


def test_fold_keeps_each_policy_with_its_newest_report_newest_first() -> None:
    newest_first = [
        event("applied", 2, 9),
        event("issued", 2, 8),
        event("applied", 1, 5),
        event("failed", 1, 2, "nft: busy"),
        event("issued", 1, 1),
        event("failed", 0, 0, "trimmed policy"),  # its issue event was trimmed away
    ]
    folded = fold_timeline(newest_first, limit=10)
    assert [(p.sequence, p.status) for p in folded] == [(2, "applied"), (1, "applied")]
    assert fold_timeline(newest_first, limit=1)[0].sequence == 2
    pending = fold_timeline([event("issued", 3, 10)], limit=5)
    assert (pending[0].status, pending[0].reported_at) == ("pending", None)


def test_reports_name_their_policy_by_sequence_and_earlier_reports_by_id_still_fold() -> None:
    by_sequence = event("applied", 2, 9).model_copy(update={"policy_id": "", "mode": None})
    earlier_format = event("failed", 1, 5, "nft: busy")  # carries policy id and mode
    foreign = event("applied", 1, 7).model_copy(update={"policy_id": "p-other"})
    folded = fold_timeline(
        [by_sequence, event("issued", 2, 8), foreign, earlier_format, event("issued", 1, 1)],
        limit=10,
    )
    assert [(p.sequence, p.policy_id, p.mode, p.status) for p in folded] == [
        (2, "p-2", "standard", "applied"),
        (1, "p-1", "standard", "failed"),  # the report naming another policy does not count
    ]
