"""REST routes of the isolation service (DESIGN.md §4): thin, each one call into the use cases."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from aiokafka.errors import KafkaError
from fastapi import APIRouter, FastAPI, Path, Query, status
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from services.isolation.adapters.replicas import ReplicaLagError
from services.isolation.adapters.settings_client import SettingsUnavailableError
from services.isolation.domain import EndpointIsolation
from services.isolation.handlers import (
    AccountForbiddenError,
    EndpointNotFoundError,
    IsolationService,
    RefreshNotAllowedError,
    StrictOverrideDeniedError,
)
from services.isolation.inventory import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    InvalidCursorError,
    InventoryItem,
    InventoryService,
)
from services.isolation.timeline import TIMELINE_MAX_POLICIES, TimelinePolicy
from shared.auth import (
    SCOPE_ISOLATION_READ,
    SCOPE_ISOLATION_WRITE,
    Principal,
    scoped_principal,
)
from shared.messages import (
    AllowedPeer,
    AllowlistUsage,
    FrozenPolicy,
    IsolationMode,
    IsolationState,
    PeerProtocol,
    PolicyMode,
)
from shared.problems import ErrorMapping, InputRejectedError, ProblemKind

# One rule for every id in a path (the settings API's account id rule): printable ASCII, no
# whitespace or control characters, at most 128. An id such as "acct-1\n" would otherwise be
# accepted here and then fail in the consumer (it cannot be put in a URL) on every retry.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"
ID_RULE = "letters, digits, '.', '_', '@', '-'; starts with a letter or digit; at most 128"

EndpointId = Annotated[
    str, Path(pattern=ID_PATTERN, description=f"Endpoint id: {ID_RULE}.", examples=["ep-1"])
]
AccountId = Annotated[
    str, Path(pattern=ID_PATTERN, description=f"Account id: {ID_RULE}.", examples=["acct-1"])
]
# A service token must carry the scope; partner and soc tokens are not scoped.
Reader = Annotated[Principal, scoped_principal(SCOPE_ISOLATION_READ)]
Writer = Annotated[Principal, scoped_principal(SCOPE_ISOLATION_WRITE)]


class IsolationBody(BaseModel):
    """Isolate an endpoint: standard freezes the allowlist now; strict allows the platform only."""

    # Strict: 0 is not false and "3" is not 3, as the OpenAPI schema says (schemathesis checks).
    model_config = ConfigDict(extra="forbid", strict=True)

    mode: IsolationMode = Field("standard", examples=["standard", "strict"])
    reason: str = Field("", max_length=1000, examples=["incident 4711"])


class AccountStrictBody(BaseModel):
    """Strictly isolate every isolated or pending endpoint of the account (RMM compromised)."""

    # Strict: 0 is not false and "3" is not 3, as the OpenAPI schema says (schemathesis checks).
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str = Field("", max_length=1000)
    disable_allowlist: bool = Field(True, description="Also switch Tooling Connections off.")


class Accepted(BaseModel):
    """The request is in Kafka; the isolation service applies it asynchronously."""

    request_id: str


class AccountStrictAccepted(Accepted):
    """Also says how many endpoints the account-wide strict isolation covers."""

    endpoints: int


class IsolationView(BaseModel):
    """An endpoint's isolation state and the frozen policy in force or pending."""

    endpoint_id: str
    account_id: str
    state: IsolationState
    mode: PolicyMode | None
    policy: FrozenPolicy | None
    desired_sequence: int
    applied_sequence: int
    rules_sha256: str | None
    detail: str
    updated_at: datetime | None
    allowlist_usage: list[AllowlistUsage] = Field(
        default_factory=list,
        description="What the agent counted per allowed entry of the policy in force while "
        "isolated (empty when unknown).",
    )

    @classmethod
    def of(
        cls, isolation: EndpointIsolation, usage: list[AllowlistUsage] | None = None
    ) -> IsolationView:
        view = cls.model_validate(isolation.model_dump())
        return view.model_copy(update={"allowlist_usage": usage or []})


class AccountIsolations(BaseModel):
    """The account's endpoints that are isolated or pending."""

    account_id: str
    endpoints: list[IsolationView]


class PolicyDiffView(BaseModel):
    """Peers the previewed policy adds and removes, against the policy in force."""

    added: list[AllowedPeer] = Field(description="In the preview, not in the policy in force.")
    removed: list[AllowedPeer] = Field(description="In the policy in force, not in the preview.")


class PolicyPreview(BaseModel):
    """Dry run: the policy the endpoint would get if isolated (or refreshed) now."""

    endpoint_id: str
    mode: IsolationMode
    policy: FrozenPolicy | None = Field(
        description="The policy an isolation now would issue; for an endpoint in standard "
        "isolation the one a refresh would issue; the policy in force when nothing would change."
    )
    diff: PolicyDiffView = Field(
        description="Against the policy in force (both lists empty when not isolated)."
    )
    current_settings_version: int | None = Field(
        None, description="The account's allowlist version now (null: never changed)."
    )


class RefreshBody(BaseModel):
    """Refresh a standard isolation: take the account's current allowlist, without a release."""

    # Strict: the schema's types, nothing coerced (schemathesis checks).
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str = Field("", max_length=1000, examples=["new RMM relay added"])


class RevocationProgressView(BaseModel):
    """How far the revocation of one entry got across the account's isolated endpoints."""

    account_id: str
    revocation_id: str
    endpoints: int = Field(description="Endpoints that allowed the entry (tightened or not yet).")
    tightened: int = Field(description="Issued a policy without the entry.")
    applied: int = Field(description="Of those, the agent reported the new policy applied.")
    failed: int = Field(description="Of those, the agent reported it could not apply it.")


_UNAVAILABLE = ProblemKind(
    503, "Temporarily unavailable", "temporarily unavailable; retry", retry_after=1
)
# Every error a route may raise and how it answers (RFC 9457, shared.problems).
ERRORS = ErrorMapping(
    {
        EndpointNotFoundError: ProblemKind(
            404, "Not found", "No enrolled endpoint with this id", "endpoint_id", "enrolled"
        ),
        AccountForbiddenError: ProblemKind(
            403,
            "Forbidden",
            "The endpoint or account belongs to another account",
            "account_id",
            "same_account",
        ),
        StrictOverrideDeniedError: ProblemKind(
            403,
            "Forbidden",
            "Only the SOC may release or relax a strict isolation",
            "mode",
            "strict_override",
        ),
        RefreshNotAllowedError: ProblemKind(
            409,
            "Conflict",
            "Not in standard isolation (strict, not isolated, or releasing)",
            "state",
            "standard_isolation",
        ),
        ReplicaLagError: _UNAVAILABLE,
        SettingsUnavailableError: _UNAVAILABLE,
        KafkaError: _UNAVAILABLE,
        RedisError: _UNAVAILABLE,
        TimeoutError: _UNAVAILABLE,
    },
    fields={"endpoint_id": "path.endpoint_id"},
    everywhere=(RedisError,),
)
_ENDPOINT_ERRORS = ERRORS.responses(EndpointNotFoundError, AccountForbiddenError)
_WRITE_ERRORS = ERRORS.responses(
    EndpointNotFoundError, AccountForbiddenError, StrictOverrideDeniedError
)
_ACCOUNT_ERRORS = ERRORS.responses(AccountForbiddenError)


def build_router(service: IsolationService) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["isolation"])

    @router.post(
        "/endpoints/{endpoint_id}/isolation",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=Accepted,
        responses=_WRITE_ERRORS,
    )
    async def isolate(endpoint_id: EndpointId, body: IsolationBody, principal: Writer) -> Accepted:
        request_id = await service.submit_isolation(endpoint_id, body.mode, body.reason, principal)
        return Accepted(request_id=request_id)

    @router.delete(
        "/endpoints/{endpoint_id}/isolation",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=Accepted,
        responses=_WRITE_ERRORS,
    )
    async def release(
        endpoint_id: EndpointId,
        principal: Writer,
        reason: Annotated[str, Query(max_length=1000)] = "",
    ) -> Accepted:
        return Accepted(request_id=await service.submit_release(endpoint_id, reason, principal))

    @router.post(
        "/accounts/{account_id}/strict-isolation",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=AccountStrictAccepted,
        responses=_ACCOUNT_ERRORS,
    )
    async def strict_isolate_account(
        account_id: AccountId, body: AccountStrictBody, principal: Writer
    ) -> AccountStrictAccepted:
        request_id, covered = await service.submit_account_strict(
            account_id, body.reason, body.disable_allowlist, principal
        )
        return AccountStrictAccepted(request_id=request_id, endpoints=covered)

    @router.get(
        "/endpoints/{endpoint_id}/isolation",
        response_model=IsolationView,
        responses=_ENDPOINT_ERRORS,
    )
    async def get_isolation(endpoint_id: EndpointId, principal: Reader) -> IsolationView:
        isolation = await service.isolation_of(endpoint_id, principal)
        return IsolationView.of(isolation, await service.usage_of(isolation))

    @router.get(
        "/accounts/{account_id}/isolations",
        response_model=AccountIsolations,
        responses=_ACCOUNT_ERRORS,
    )
    async def list_isolations(account_id: AccountId, principal: Reader) -> AccountIsolations:
        states = await service.isolations_of_account(account_id, principal)
        return AccountIsolations(
            account_id=account_id, endpoints=[IsolationView.of(s) for s in states]
        )

    @router.get(
        "/endpoints/{endpoint_id}/isolation/preview",
        response_model=PolicyPreview,
        responses=_ENDPOINT_ERRORS,
    )
    async def preview(
        endpoint_id: EndpointId,
        principal: Reader,
        mode: Annotated[IsolationMode, Query()] = "standard",
    ) -> PolicyPreview:
        result = await service.preview(endpoint_id, mode, principal)
        return PolicyPreview(
            endpoint_id=endpoint_id,
            mode=mode,
            policy=result.policy,
            diff=PolicyDiffView(added=list(result.diff.added), removed=list(result.diff.removed)),
            current_settings_version=result.current_settings_version,
        )

    @router.post(
        "/endpoints/{endpoint_id}/isolation/refresh",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=Accepted,
        responses=ERRORS.responses(
            EndpointNotFoundError, AccountForbiddenError, RefreshNotAllowedError
        ),
    )
    async def refresh(endpoint_id: EndpointId, body: RefreshBody, principal: Writer) -> Accepted:
        """A standard isolation takes a new snapshot of the current allowlist (audited)."""
        return Accepted(
            request_id=await service.submit_refresh(endpoint_id, body.reason, principal)
        )

    @router.get(
        "/accounts/{account_id}/revocations/{revocation_id}",
        response_model=RevocationProgressView,
        responses=_ACCOUNT_ERRORS,
    )
    async def revocation_progress(
        account_id: AccountId,
        revocation_id: Annotated[str, Path(pattern=ID_PATTERN, description="Revocation id.")],
        principal: Reader,
        address: Annotated[str, Query(max_length=64, description="The revoked entry's address.")],
        ports: Annotated[
            list[int] | None, Query(description="The revoked entry's ports (repeat the parameter).")
        ] = None,
        protocol: Annotated[
            PeerProtocol, Query(description="The revoked entry's protocol.")
        ] = "any",
    ) -> RevocationProgressView:
        """Endpoints the revocation concerns, how many are tightened, and how many applied."""
        try:
            target = AllowedPeer(
                name="", address=address, ports=tuple(ports or ()), protocol=protocol
            )
        except ValueError as exc:
            raise InputRejectedError("query.address", "address", str(exc)) from exc
        progress = await service.revocation_progress(account_id, revocation_id, target, principal)
        return RevocationProgressView(
            account_id=account_id,
            revocation_id=revocation_id,
            endpoints=progress.endpoints,
            tightened=progress.tightened,
            applied=progress.applied,
            failed=progress.failed,
        )

    return router


def add_error_handlers(app: FastAPI) -> None:
    """Named errors become 4xx; infrastructure trouble a 503 that does not leak internals."""
    ERRORS.install(app)


# --- inventory and timeline ------------------------------------------------------------


class EndpointInventory(BaseModel):
    """A page of the account's enrolled endpoints, in hostname order."""

    items: list[InventoryItem]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page. A page may hold"
        " fewer than `limit` items (a narrow filter scans a bounded part of the account)."
    )


class IsolationTimeline(BaseModel):
    """The policies issued to an endpoint, newest first, with the agent's answer to each."""

    endpoint_id: str
    items: list[TimelinePolicy]


def _invalid_query(name: str, message: str) -> InputRejectedError:
    # A 422 problem naming the query field, like FastAPI's own query validation.
    return InputRejectedError(f"query.{name}", "valid_cursor", message)


def build_inventory_router(inventory: InventoryService) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["inventory"])

    @router.get(
        "/accounts/{account_id}/endpoints",
        response_model=EndpointInventory,
        responses=_ACCOUNT_ERRORS,
        summary="List the account's enrolled endpoints",
    )
    async def list_endpoints(
        account_id: AccountId,
        principal: Reader,
        state: Annotated[
            IsolationState | None, Query(description="Only endpoints in this state.")
        ] = None,
        q: Annotated[
            str | None,
            Query(max_length=255, description="Hostname substring (case-insensitive)."),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
        cursor: Annotated[
            str | None, Query(max_length=2048, description="`next_cursor` of the previous page.")
        ] = None,
    ) -> EndpointInventory:
        try:
            page = await inventory.endpoints(
                account_id, principal, state=state, text=q, limit=limit, cursor=cursor
            )
        except InvalidCursorError as exc:
            raise _invalid_query("cursor", str(exc)) from exc
        return EndpointInventory(items=page.items, next_cursor=page.next_cursor)

    @router.get(
        "/endpoints/{endpoint_id}/isolation/timeline",
        response_model=IsolationTimeline,
        responses=_ENDPOINT_ERRORS,
        summary="The policies issued to an endpoint and the agent's answers",
    )
    async def isolation_timeline(
        endpoint_id: EndpointId,
        principal: Reader,
        limit: Annotated[int, Query(ge=1, le=TIMELINE_MAX_POLICIES)] = 50,
    ) -> IsolationTimeline:
        items = await inventory.timeline(endpoint_id, principal, limit)
        return IsolationTimeline(endpoint_id=endpoint_id, items=items)

    return router
