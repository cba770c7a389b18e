"""REST routes of the isolation service (DESIGN.md §4): thin, each one call into the use cases."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from aiokafka.errors import KafkaError
from fastapi import APIRouter, FastAPI, Path, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from services.isolation.adapters.replicas import ReplicaLagError
from services.isolation.adapters.settings_client import SettingsUnavailableError
from services.isolation.domain import EndpointIsolation
from services.isolation.handlers import (
    AccountForbiddenError,
    EndpointNotFoundError,
    IsolationService,
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
from shared.messages import FrozenPolicy, IsolationMode, IsolationState, PolicyMode

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

    model_config = ConfigDict(extra="forbid")

    mode: IsolationMode = Field("standard", examples=["standard", "strict"])
    reason: str = Field("", max_length=1000, examples=["incident 4711"])


class AccountStrictBody(BaseModel):
    """Strictly isolate every isolated or pending endpoint of the account (RMM compromised)."""

    model_config = ConfigDict(extra="forbid")

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

    @classmethod
    def of(cls, isolation: EndpointIsolation) -> IsolationView:
        return cls.model_validate(isolation.model_dump())


class AccountIsolations(BaseModel):
    """The account's endpoints that are isolated or pending."""

    account_id: str
    endpoints: list[IsolationView]


class PolicyPreview(BaseModel):
    """Dry run: the policy the endpoint would get if isolated now (``null``: none would change)."""

    endpoint_id: str
    mode: IsolationMode
    policy: FrozenPolicy | None


def build_router(service: IsolationService) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["isolation"])

    @router.post(
        "/endpoints/{endpoint_id}/isolation",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=Accepted,
    )
    async def isolate(endpoint_id: EndpointId, body: IsolationBody, principal: Writer) -> Accepted:
        request_id = await service.submit_isolation(endpoint_id, body.mode, body.reason, principal)
        return Accepted(request_id=request_id)

    @router.delete(
        "/endpoints/{endpoint_id}/isolation",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=Accepted,
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
    )
    async def strict_isolate_account(
        account_id: AccountId, body: AccountStrictBody, principal: Writer
    ) -> AccountStrictAccepted:
        request_id, covered = await service.submit_account_strict(
            account_id, body.reason, body.disable_allowlist, principal
        )
        return AccountStrictAccepted(request_id=request_id, endpoints=covered)

    @router.get("/endpoints/{endpoint_id}/isolation", response_model=IsolationView)
    async def get_isolation(endpoint_id: EndpointId, principal: Reader) -> IsolationView:
        return IsolationView.of(await service.isolation_of(endpoint_id, principal))

    @router.get("/accounts/{account_id}/isolations", response_model=AccountIsolations)
    async def list_isolations(account_id: AccountId, principal: Reader) -> AccountIsolations:
        states = await service.isolations_of_account(account_id, principal)
        return AccountIsolations(
            account_id=account_id, endpoints=[IsolationView.of(s) for s in states]
        )

    @router.get("/endpoints/{endpoint_id}/isolation/preview", response_model=PolicyPreview)
    async def preview(
        endpoint_id: EndpointId,
        principal: Reader,
        mode: Annotated[IsolationMode, Query()] = "standard",
    ) -> PolicyPreview:
        policy = await service.preview(endpoint_id, mode, principal)
        return PolicyPreview(endpoint_id=endpoint_id, mode=mode, policy=policy)

    return router


def add_error_handlers(app: FastAPI) -> None:
    """Named errors become 4xx; infrastructure trouble a 503 that does not leak internals."""

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_404_NOT_FOUND)

    async def forbidden(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_403_FORBIDDEN)

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": f"temporarily unavailable ({type(exc).__name__}); retry"},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    app.add_exception_handler(EndpointNotFoundError, not_found)
    app.add_exception_handler(AccountForbiddenError, forbidden)
    app.add_exception_handler(StrictOverrideDeniedError, forbidden)
    for error in (ReplicaLagError, SettingsUnavailableError, KafkaError, RedisError, TimeoutError):
        app.add_exception_handler(error, unavailable)


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


def _invalid_query(name: str, message: str) -> RequestValidationError:
    # The same 422 as FastAPI's own query validation, so every error names its field alike.
    return RequestValidationError(
        [{"type": "value_error", "loc": ("query", name), "msg": message, "input": None}]
    )


_READ_ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "Missing, expired or forged bearer token"},
    403: {"description": "A partner token for another account"},
    422: {"description": "Invalid parameter (the field is named)"},
    503: {"description": "Redis, Kafka or the registry replica unavailable or behind; retry"},
}


def build_inventory_router(inventory: InventoryService) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["inventory"])

    @router.get(
        "/accounts/{account_id}/endpoints",
        response_model=EndpointInventory,
        responses=_READ_ERRORS,
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
        responses={**_READ_ERRORS, 404: {"description": "No enrolled endpoint with this id"}},
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
