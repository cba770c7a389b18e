"""The endpoint inventory and timeline use cases (every enrolled endpoint, not only isolated ones).

The registry replica keeps a per-account index of the account's endpoints, ordered by hostname
(then endpoint id); a page walks that index from an opaque cursor and joins each row with the
endpoint's isolation state. A page scans a bounded number of index rows, so a narrow filter on
a large account answers quickly with fewer items and a cursor to go on from.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from services.isolation.domain import EndpointIsolation, EndpointRecord
from services.isolation.handlers import AccountForbiddenError, EndpointNotFoundError
from services.isolation.timeline import TimelineEvent, TimelinePolicy, fold_timeline
from shared.messages import Actor, AuditRecorded, IsolationState, PolicyMode

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
MAX_LIMIT = 500
# Index rows one page may look at: bounds the work of a filtered page on a large account.
MAX_SCAN_PER_PAGE = 5000
SCAN_CHUNK = 500
_CURSOR_PREFIX = "v1:"
_SEPARATOR = "\x00"


class InventoryRow(BaseModel):
    """An endpoint as the inventory index stores it (from ``endpoints.v1``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    endpoint_id: str
    account_id: str
    hostname: str
    platform: str
    enrolled_at: datetime | None = None
    last_seen: datetime | None = None

    @property
    def sort_key(self) -> str:
        return sort_key(self.hostname, self.endpoint_id)

    @property
    def version_ms(self) -> int:
        """Newer registrations replace older ones; a replay of an older one changes nothing."""
        times = [t for t in (self.enrolled_at, self.last_seen) if t is not None]
        return int(max(times).timestamp() * 1000) if times else 0


class InventoryItem(BaseModel):
    """One endpoint of the account with its isolation state."""

    endpoint_id: str
    hostname: str
    platform: str
    enrolled_at: datetime | None
    last_seen: datetime | None = Field(description="When the agent last polled (null: never).")
    state: IsolationState
    mode: PolicyMode | None
    applied_sequence: int


@dataclass(frozen=True)
class InventoryPage:
    """Items in hostname order, and where the next page starts (None: no more)."""

    items: list[InventoryItem]
    next_cursor: str | None


class InvalidCursorError(ValueError):
    """The cursor is not one this API handed out."""


def sort_key(hostname: str, endpoint_id: str) -> str:
    """Index order: case-insensitive hostname, then endpoint id (the first NUL separates them)."""
    return f"{hostname.lower().replace(_SEPARATOR, '')}{_SEPARATOR}{endpoint_id}"


def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode((_CURSOR_PREFIX + key).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The index position a cursor names; InvalidCursorError for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidCursorError("cursor: not a cursor of this API (pass next_cursor)") from exc
    if not raw.startswith(_CURSOR_PREFIX) or _SEPARATOR not in raw:
        raise InvalidCursorError("cursor: not a cursor of this API (pass next_cursor)")
    return raw[len(_CURSOR_PREFIX) :]


def item_of(row: InventoryRow, isolation: EndpointIsolation | None) -> InventoryItem:
    return InventoryItem(
        endpoint_id=row.endpoint_id,
        hostname=row.hostname,
        platform=row.platform,
        enrolled_at=row.enrolled_at,
        last_seen=row.last_seen,
        state=isolation.state if isolation else "not_isolated",
        mode=isolation.mode if isolation else None,
        applied_sequence=isolation.applied_sequence if isolation else 0,
    )


def matches(item: InventoryItem, state: IsolationState | None, text: str | None) -> bool:
    if state is not None and item.state != state:
        return False
    return not text or text.lower() in item.hostname.lower()


# --- ports ----------------------------------------------------------------------------


class InventoryIndex(Protocol):
    async def scan(self, account_id: str, after: str | None, count: int) -> list[InventoryRow]:
        """Rows of the account after index position ``after`` (exclusive), in index order."""
        ...


class IsolationStates(Protocol):
    async def load_many(self, endpoint_ids: list[str]) -> list[EndpointIsolation]: ...

    async def timeline(self, endpoint_id: str, count: int) -> list[TimelineEvent]: ...


class EndpointLookup(Protocol):
    async def get(self, endpoint_id: str) -> EndpointRecord | None: ...

    async def sync(self) -> None:
        """Return once every registration acknowledged before the call is in the index."""
        ...


class AuditSink(Protocol):
    async def send_audit(self, audit: AuditRecorded) -> None: ...


# --- use cases ------------------------------------------------------------------------


class InventoryService:
    """Lists an account's endpoints and tells an endpoint's isolation timeline."""

    def __init__(
        self,
        index: InventoryIndex,
        states: IsolationStates,
        registry: EndpointLookup,
        audit: AuditSink,
        *,
        max_scan: int = MAX_SCAN_PER_PAGE,
        chunk: int = SCAN_CHUNK,
    ) -> None:
        self._index = index
        self._states = states
        self._registry = registry
        self._audit = audit
        self._max_scan = max_scan
        self._chunk = chunk

    async def endpoints(
        self,
        account_id: str,
        actor: Actor,
        *,
        state: IsolationState | None = None,
        text: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> InventoryPage:
        await self._authorize(actor, account_id, None)
        after = decode_cursor(cursor) if cursor else None
        # Read-your-writes: an endpoint whose enrollment was answered before this request is listed.
        await self._registry.sync()
        items: list[InventoryItem] = []
        scanned = 0
        while len(items) < limit and scanned < self._max_scan:
            count = min(self._chunk, self._max_scan - scanned)
            rows = await self._index.scan(account_id, after, count)
            exhausted = len(rows) < count
            wanted = [r.endpoint_id for r in rows if not text or text.lower() in r.hostname.lower()]
            by_id = {s.endpoint_id: s for s in await self._states.load_many(wanted)}
            for position, row in enumerate(rows, 1):
                scanned += 1
                after = row.sort_key
                item = item_of(row, by_id.get(row.endpoint_id))
                if not matches(item, state, text):
                    continue
                items.append(item)
                if len(items) == limit:
                    last = exhausted and position == len(rows)
                    return InventoryPage(items, None if last else encode_cursor(after))
            if exhausted:
                return InventoryPage(items, None)
        # The scan budget ran out first: fewer items, and a cursor to go on from.
        return InventoryPage(items, encode_cursor(after) if after is not None else None)

    async def timeline(self, endpoint_id: str, actor: Actor, limit: int) -> list[TimelinePolicy]:
        endpoint = await self._registry.get(endpoint_id)
        if endpoint is None:
            raise EndpointNotFoundError(f"endpoint_id: no enrolled endpoint {endpoint_id!r}")
        await self._authorize(actor, endpoint.account_id, endpoint_id)
        events = await self._states.timeline(endpoint_id, 2 * limit)
        return fold_timeline(events, limit)

    async def _authorize(self, actor: Actor, account_id: str, endpoint_id: str | None) -> None:
        if actor.role in ("soc", "service") or actor.account_id == account_id:
            return
        what = f"endpoint {endpoint_id}" if endpoint_id else f"account {account_id}"
        reason = f"{what} belongs to another account"
        await self._audit.send_audit(
            AuditRecorded(
                service="isolation",
                action="isolation.read",
                outcome="denied",
                actor=actor,
                account_id=account_id,
                endpoint_id=endpoint_id,
                detail=reason,
            )
        )
        log.warning(
            "request denied",
            extra={"account_id": account_id, "endpoint_id": endpoint_id, "reason": reason},
        )
        raise AccountForbiddenError(reason)
