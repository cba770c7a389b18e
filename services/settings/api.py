"""REST API of the settings service (DESIGN.md §4): thin routes over the handlers."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from redis.exceptions import RedisError

from services.settings.domain import (
    KEEP,
    Allowlist,
    Change,
    DuplicateAddressError,
    EntryNotFoundError,
    EntryRejectedError,
    InvalidIfMatchError,
    SettingsError,
    StaleVersionError,
    find_entry,
    parse_if_match,
)
from services.settings.handlers import (
    AccountAccessDeniedError,
    ConcurrentChangeError,
    NotPublishedError,
    SettingsHandlers,
)
from services.settings.metrics import SettingsMetrics
from shared.auth import (
    SCOPE_ALLOWLIST_READ,
    SCOPE_ALLOWLIST_WRITE,
    SCOPE_ENROLLMENT_KEY_READ,
    CurrentPrincipal,
    Principal,
    require_scope,
)
from shared.messages import AllowlistEntry, PeerProtocol
from shared.problems import ErrorMapping, Problem, ProblemKind, problem_doc, problem_response

log = logging.getLogger(__name__)

ACCOUNT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"

AccountId = Annotated[
    str,
    Path(
        pattern=ACCOUNT_ID_PATTERN,
        description="Account id: letters, digits, '.', '_', '@', '-' (at most 128).",
        examples=["acct-1"],
    ),
]
EntryId = Annotated[str, Path(max_length=128, description="Entry id (UUID).")]
IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        description='Settings version the change is based on, e.g. "7"; 412 if stale.',
    ),
]


# --- wire schemas ----------------------------------------------------------------------


class EntryView(BaseModel):
    """One allowlist entry."""

    id: str
    name: str = Field(examples=["ConnectWise Automate"])
    address: str = Field(
        description="Canonical address or prefix (RFC 5952 for IPv6; /32 and /128 are plain).",
        examples=["203.0.113.10", "2001:db8::10", "198.51.100.0/24"],
    )
    ports: list[int] = Field(description="Destination ports; empty: every port.", examples=[[]])
    protocol: PeerProtocol = Field(description='"tcp", "udp" or "any".', examples=["any"])
    expires_at: datetime | None = Field(
        description="When the entry stops allowing traffic; null: never.", examples=[None]
    )
    created_at: datetime
    created_by: str

    @classmethod
    def of(cls, entry: AllowlistEntry) -> EntryView:
        return cls.model_validate(entry.model_dump())


class AllowlistView(BaseModel):
    """An account's Tooling Allowlist; ``version`` is also the ETag."""

    account_id: str
    enabled: bool = Field(description='The "Tooling Connections" switch.')
    entries: list[EntryView]
    version: int = Field(description="Settings version, strictly increasing per account.")
    updated_at: datetime | None

    @classmethod
    def of(cls, allowlist: Allowlist) -> AllowlistView:
        return cls(
            account_id=allowlist.account_id,
            enabled=allowlist.enabled,
            entries=[EntryView.of(e) for e in allowlist.entries],
            version=allowlist.version,
            updated_at=allowlist.updated_at,
        )


class EntryWritten(AllowlistView):
    """The allowlist after an entry was added or changed, and that entry."""

    entry: EntryView


class HistoryRecord(BaseModel):
    """One audited change: who, when, what, and the part that changed before and after."""

    version: int
    action: str = Field(examples=["allowlist.entry.add"])
    actor: dict[str, Any]
    at: datetime
    detail: str
    before: dict[str, Any] | None = Field(
        description="Entry changes: the entry {id, name, address} (and its ports, protocol, "
        "expires_at when set) before (null when added); "
        'the switch: {"enabled": ...}. Records written before 2026-12 hold the whole list.'
    )
    after: dict[str, Any] | None = Field(
        description="The same after the change (null when the entry was removed)."
    )
    event_id: str


class HistoryView(BaseModel):
    """A page of the audit records of an account's allowlist, newest first."""

    account_id: str
    version: int
    records: list[HistoryRecord]
    next_before_version: int | None = Field(
        description="Pass as before_version for the next (older) page; null on the last page."
    )


class SwitchRequest(BaseModel):
    """Turn "Tooling Connections" on or off."""

    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool


_ADDRESS_DESCRIPTION = (
    "A static unicast IPv4 address (dotted quad) or IPv4 CIDR no wider than /24, or an IPv6 "
    "address or prefix no wider than /64 (limits configurable); host bits zero."
)
_PORTS_DESCRIPTION = "0-16 distinct ports 1-65535 (default: empty, every port); need tcp or udp."
_PROTOCOL_SCHEMA: dict[str, Any] = {"enum": ["tcp", "udp", "any"]}
_EXPIRES_SCHEMA: dict[str, Any] = {"format": "date-time"}


class NewEntryRequest(BaseModel):
    """A new entry: a display name, a static address or narrow prefix, and optionally ports,
    protocol and an expiry. ``{name, address}`` alone allows every port and protocol, forever."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(description="1–64 printable characters.", examples=["Kaseya VSA"])
    address: StrictStr = Field(
        description=_ADDRESS_DESCRIPTION,
        examples=["192.168.10.5", "198.51.100.0/24", "2001:db8::10"],
    )
    ports: list[StrictInt] | None = Field(None, description=_PORTS_DESCRIPTION, examples=[[8041]])
    protocol: StrictStr | None = Field(
        None,
        description='"tcp", "udp" or "any" (default "any").',
        examples=["tcp"],
        json_schema_extra=_PROTOCOL_SCHEMA,
    )
    expires_at: StrictStr | None = Field(
        None,
        description="RFC 3339 time with an offset, in the future and at most 90 days ahead; "
        "null or absent: never expires.",
        examples=["2026-12-31T18:00:00Z"],
        json_schema_extra=_EXPIRES_SCHEMA,
    )


class EntryChangeRequest(BaseModel):
    """Change an entry's name, address, ports, protocol or expiry (the rules of a new entry);
    ``expires_at: null`` removes the expiry, an absent field keeps its value."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr | None = None
    address: StrictStr | None = Field(None, description=_ADDRESS_DESCRIPTION)
    ports: list[StrictInt] | None = Field(None, description=_PORTS_DESCRIPTION)
    protocol: StrictStr | None = Field(None, json_schema_extra=_PROTOCOL_SCHEMA)
    expires_at: StrictStr | None = Field(None, json_schema_extra=_EXPIRES_SCHEMA)


class UnpublishedProblem(Problem):
    """503: the change is saved in the outbox but not yet in Kafka."""

    version: int = Field(description="The saved version (also the ETag).", examples=[8])


class MovedProblem(Problem):
    """410: the route moved; ``location`` is where to go."""

    location: str = Field(examples=["/v1/accounts/acct-1/enrollment-keys"])


# Every domain error of the settings service and how it answers (RFC 9457, shared.problems).
ERRORS = ErrorMapping(
    {
        DuplicateAddressError: ProblemKind(
            409, "Duplicate address", "Another entry already covers this one (named)"
        ),
        EntryRejectedError: ProblemKind(
            422, "Invalid input", "Invalid input (field and rule named)"
        ),
        InvalidIfMatchError: ProblemKind(422, "Invalid input", "If-Match is not a version"),
        EntryNotFoundError: ProblemKind(404, "Not found", "No such entry"),
        StaleVersionError: ProblemKind(412, "Stale version", "If-Match names a stale version"),
        AccountAccessDeniedError: ProblemKind(403, "Forbidden", "A token of another account"),
        ConcurrentChangeError: ProblemKind(
            409, "Concurrent change", "The allowlist kept changing; retry", retry_after=1
        ),
        NotPublishedError: ProblemKind(
            503,
            "Not yet published",
            "Saved, but not yet in Kafka",
            retry_after=5,
            model=UnpublishedProblem,
        ),
        RedisError: ProblemKind(
            503,
            "Store unavailable",
            "settings store unavailable; the change may not be saved, retry",
            retry_after=2,
            log_level=logging.ERROR,
        ),
        SettingsError: ProblemKind(400, "Refused", "Refused (field and rule named)"),
    },
    fields={
        "name": "body.name",
        "address": "body.address",
        "ports": "body.ports",
        "protocol": "body.protocol",
        "expires_at": "body.expires_at",
        "reason": "body.reason",
        "If-Match": "header.If-Match",
        "entry_id": "path.entry_id",
        "account_id": "path.account_id",
        "entries": "allowlist.entries",
    },
    everywhere=(RedisError,),
)
_READ_ERRORS = ERRORS.responses(AccountAccessDeniedError)
_WRITE_ERRORS = ERRORS.responses(
    AccountAccessDeniedError,
    EntryRejectedError,
    InvalidIfMatchError,
    StaleVersionError,
    ConcurrentChangeError,
    NotPublishedError,
)
_ENTRY_ERRORS = {**_WRITE_ERRORS, **ERRORS.responses(EntryNotFoundError)}
_ADD_ERRORS = ERRORS.responses(
    AccountAccessDeniedError,
    EntryRejectedError,
    DuplicateAddressError,
    InvalidIfMatchError,
    StaleVersionError,
    ConcurrentChangeError,
    NotPublishedError,
)
_CHANGE_ERRORS = {**_ADD_ERRORS, **ERRORS.responses(EntryNotFoundError)}


# --- dependencies ----------------------------------------------------------------------


@dataclass(frozen=True)
class AccountAccess:
    """An authenticated caller allowed to touch ``account_id``."""

    principal: Principal
    account_id: str
    handlers: SettingsHandlers


# The scope a service token needs for each action (partner and soc tokens are not scoped).
_SCOPE_OF_ACTION = {
    "allowlist.read": SCOPE_ALLOWLIST_READ,
    "allowlist.history": SCOPE_ALLOWLIST_READ,
    "allowlist.switch": SCOPE_ALLOWLIST_WRITE,
    "allowlist.entry.add": SCOPE_ALLOWLIST_WRITE,
    "allowlist.entry.update": SCOPE_ALLOWLIST_WRITE,
    "allowlist.entry.remove": SCOPE_ALLOWLIST_WRITE,
    "allowlist.entry.revoke": SCOPE_ALLOWLIST_WRITE,
    "enrollment_key.read": SCOPE_ENROLLMENT_KEY_READ,
}


def _access(action: str) -> Callable[..., Awaitable[AccountAccess]]:
    # An action not listed needs a scope named after itself: a service token never gets it by
    # accident.
    scope = _SCOPE_OF_ACTION.get(action, action)

    # Runs before the body is validated, so a partner learns nothing about another account.
    async def dependency(
        request: Request, account_id: AccountId, principal: CurrentPrincipal
    ) -> AccountAccess:
        require_scope(principal, scope)
        handlers: SettingsHandlers = request.app.state.handlers
        await handlers.authorize(principal, account_id, action)
        return AccountAccess(principal, account_id, handlers)

    return dependency


def _if_match(raw: str | None) -> int | None:
    return parse_if_match(raw)


def _with_etag(response: Response, version: int) -> None:
    response.headers["ETag"] = f'"{version}"'


# --- routes ----------------------------------------------------------------------------

router = APIRouter(prefix="/v1/accounts/{account_id}", tags=["tooling allowlist"])


@router.get("/tooling-allowlist", response_model=AllowlistView, responses=_READ_ERRORS)
async def read_allowlist(
    access: Annotated[AccountAccess, Depends(_access("allowlist.read"))], response: Response
) -> AllowlistView:
    """The account's Tooling Allowlist; the ETag header is its version."""
    allowlist = await access.handlers.read_allowlist(access.account_id)
    _with_etag(response, allowlist.version)
    return AllowlistView.of(allowlist)


@router.patch("/tooling-allowlist", response_model=AllowlistView, responses=_WRITE_ERRORS)
async def switch_tooling_connections(
    access: Annotated[AccountAccess, Depends(_access("allowlist.switch"))],
    body: SwitchRequest,
    response: Response,
    if_match: IfMatch = None,
) -> AllowlistView:
    """Switch "Tooling Connections" on or off; 2xx means the change event is in Kafka."""
    allowlist = await access.handlers.set_enabled(
        access.principal, access.account_id, body.enabled, _if_match(if_match)
    )
    _with_etag(response, allowlist.version)
    return AllowlistView.of(allowlist)


@router.post(
    "/tooling-allowlist/entries",
    response_model=EntryWritten,
    status_code=status.HTTP_201_CREATED,
    responses=_ADD_ERRORS,
)
async def add_entry(
    access: Annotated[AccountAccess, Depends(_access("allowlist.entry.add"))],
    body: NewEntryRequest,
    response: Response,
    if_match: IfMatch = None,
) -> EntryWritten:
    """Add an entry (address or prefix, optional ports/protocol/expiry); 409 naming the entry
    that already covers it."""
    allowlist, change = await access.handlers.add_entry(
        access.principal,
        access.account_id,
        body.name,
        body.address,
        _if_match(if_match),
        ports=body.ports,
        protocol=body.protocol,
        expires_at=body.expires_at,
    )
    return _entry_written(response, allowlist, change)


@router.patch(
    "/tooling-allowlist/entries/{entry_id}", response_model=EntryWritten, responses=_CHANGE_ERRORS
)
async def change_entry(
    access: Annotated[AccountAccess, Depends(_access("allowlist.entry.update"))],
    entry_id: EntryId,
    body: EntryChangeRequest,
    response: Response,
    if_match: IfMatch = None,
) -> EntryWritten:
    """Change an entry's name, address, ports, protocol or expiry."""
    # ``expires_at: null`` is a change (remove the expiry); another field's null is "keep".
    given = {f for f in body.model_fields_set if f == "expires_at" or getattr(body, f) is not None}
    if not given:
        raise EntryRejectedError(
            "body", "empty", "give a new name, address, ports, protocol or expires_at"
        )
    allowlist, change = await access.handlers.update_entry(
        access.principal,
        access.account_id,
        entry_id,
        body.name,
        body.address,
        _if_match(if_match),
        ports=body.ports,
        protocol=body.protocol,
        expires_at=body.expires_at if "expires_at" in body.model_fields_set else KEEP,
    )
    if change is None:
        change = _unchanged(allowlist, entry_id)
    return _entry_written(response, allowlist, change)


@router.delete(
    "/tooling-allowlist/entries/{entry_id}", response_model=AllowlistView, responses=_ENTRY_ERRORS
)
async def remove_entry(
    access: Annotated[AccountAccess, Depends(_access("allowlist.entry.remove"))],
    entry_id: EntryId,
    response: Response,
    if_match: IfMatch = None,
) -> AllowlistView:
    """Remove an entry; answers the allowlist without it."""
    allowlist = await access.handlers.remove_entry(
        access.principal, access.account_id, entry_id, _if_match(if_match)
    )
    _with_etag(response, allowlist.version)
    return AllowlistView.of(allowlist)


@router.get("/tooling-allowlist/history", response_model=HistoryView, responses=_READ_ERRORS)
async def read_history(
    access: Annotated[AccountAccess, Depends(_access("allowlist.history"))],
    response: Response,
    limit: Annotated[int, Query(ge=1, le=100, description="Records per page (1-100).")] = 50,
    before_version: Annotated[
        int | None, Query(ge=1, description="Only records older than this version.")
    ] = None,
) -> HistoryView:
    """Audit records (actor, time, what changed), newest first, one page at a time."""
    allowlist, records, next_before = await access.handlers.history(
        access.account_id, limit=limit, before_version=before_version
    )
    _with_etag(response, allowlist.version)
    return HistoryView(
        account_id=access.account_id,
        version=allowlist.version,
        records=[HistoryRecord.model_validate(r) for r in records],
        next_before_version=next_before,
    )


@router.get(
    "/enrollment-key",
    status_code=status.HTTP_410_GONE,
    responses={
        **_READ_ERRORS,
        410: problem_doc(
            "Moved: the enforcer issues, lists and revokes enrollment keys", MovedProblem
        ),
    },
)
async def read_enrollment_key(
    access: Annotated[AccountAccess, Depends(_access("enrollment_key.read"))],
) -> JSONResponse:
    """Gone: enrollment keys are random, stored hashed and shown once, by the enforcer.

    ``POST /v1/accounts/{account_id}/enrollment-keys`` on the enforcer issues a key (and revokes
    the earlier ones); ``GET`` there lists their metadata. No service can show a key again.
    """
    moved = f"/v1/accounts/{access.account_id}/enrollment-keys"
    detail = (
        f"enrollment keys moved to the enforcer: POST {moved} issues a new key (shown once), "
        f"GET {moved} lists them, DELETE {moved}/{{key_id}} revokes one"
    )
    return problem_response(
        status.HTTP_410_GONE,
        detail,
        title="Gone",
        errors=[{"field": "enrollment_key", "rule": "moved", "message": detail}],
        extensions={"location": moved},
    )


class RevokeRequest(BaseModel):
    """Why the entry is revoked ("this tool is compromised")."""

    model_config = ConfigDict(extra="forbid", strict=True)

    reason: StrictStr = Field(
        description="1-1000 characters: audited with the revocation.",
        examples=["RMM server compromised (incident 4711)"],
    )


class RevokeAccepted(BaseModel):
    """The entry is removed and its revocation published; isolated endpoints lose it shortly."""

    entry_id: str
    revocation_id: str = Field(
        description="Follow the tightening at the isolation service's "
        "GET /v1/accounts/{account_id}/revocations/{revocation_id}?address=…"
    )
    entry: EntryView = Field(description="The revoked entry.")
    version: int = Field(description="The allowlist version that revoked it.")
    endpoints: int | None = Field(
        description="Isolated or pending endpoints of the account whose policy allowed the entry "
        "(each gets a new policy without it on the priority lanes); null when the isolation "
        "service could not be asked in time (the revocation happens regardless)."
    )
    note: str | None = Field(
        None, description="Why ``endpoints`` is null, when it is; null otherwise."
    )


@router.post(
    "/tooling-allowlist/entries/{entry_id}/revoke",
    response_model=RevokeAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    responses=_ENTRY_ERRORS,
)
async def revoke_entry(
    access: Annotated[AccountAccess, Depends(_access("allowlist.entry.revoke"))],
    entry_id: EntryId,
    body: RevokeRequest,
    response: Response,
) -> RevokeAccepted:
    """This tool is compromised: remove the entry and cut it from every isolated endpoint.

    202 once the change is saved and its event is in Kafka; the isolation service then issues,
    on the priority lanes, every endpoint whose policy allows the entry a policy without it.
    """
    allowlist, change, endpoints = await access.handlers.revoke_entry(
        access.principal, access.account_id, entry_id, body.reason
    )
    _with_etag(response, allowlist.version)
    revoked = change.revoked[0]
    return RevokeAccepted(
        entry_id=entry_id,
        revocation_id=revoked.revocation_id,
        entry=EntryView.of(revoked.entry),
        version=allowlist.version,
        endpoints=endpoints,
        note=None
        if endpoints is not None
        else "not counted: the isolation service did not answer in time; the revocation is "
        "committed and published, and isolated endpoints lose the entry regardless",
    )


def _unchanged(allowlist: Allowlist, entry_id: str) -> Change:
    entry = find_entry(allowlist, entry_id)
    return Change(action="none", before=allowlist, after=allowlist, entry=entry)


def _entry_written(response: Response, allowlist: Allowlist, change: Change | None) -> EntryWritten:
    _with_etag(response, allowlist.version)
    if change is None or change.entry is None:
        raise RuntimeError("an entry write must name its entry")
    if change.action == "allowlist.entry.add":
        response.headers["Location"] = (
            f"/v1/accounts/{allowlist.account_id}/tooling-allowlist/entries/{change.entry.id}"
        )
    return EntryWritten(
        **AllowlistView.of(allowlist).model_dump(), entry=EntryView.of(change.entry)
    )


# --- errors and metrics ----------------------------------------------------------------


def install(app: FastAPI, metrics: SettingsMetrics) -> None:
    """Add the routes and the error mapping to ``app`` (shared.http counts the requests)."""
    app.include_router(router)
    ERRORS.install(app)

    @app.exception_handler(NotPublishedError)
    async def _unpublished(request: Request, error: NotPublishedError) -> JSONResponse:
        metrics.unpublished_writes.inc()
        return problem_response(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            error.message,
            title="Not yet published",
            headers={"Retry-After": "5", "ETag": f'"{error.version}"'},
            extensions={"version": error.version},
        )
