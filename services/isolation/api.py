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
    RefreshNotAllowedError,
    StrictOverrideDeniedError,
)
from shared.auth import (
    SCOPE_ISOLATION_READ,
    SCOPE_ISOLATION_WRITE,
    Principal,
    scoped_principal,
)
from shared.messages import (
    AllowedPeer,
    FrozenPolicy,
    IsolationMode,
    IsolationState,
    PeerProtocol,
    PolicyMode,
)

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

    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=1000, examples=["new RMM relay added"])


class RevocationProgressView(BaseModel):
    """How far the revocation of one entry got across the account's isolated endpoints."""

    account_id: str
    revocation_id: str
    endpoints: int = Field(description="Endpoints that allowed the entry (tightened or not yet).")
    tightened: int = Field(description="Issued a policy without the entry.")
    applied: int = Field(description="Of those, the agent reported the new policy applied.")
    failed: int = Field(description="Of those, the agent reported it could not apply it.")


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
        responses={
            403: {"description": "Another account's endpoint"},
            404: {"description": "No enrolled endpoint with this id"},
            409: {"description": "Not in standard isolation (strict, not isolated, releasing)"},
        },
    )
    async def refresh(endpoint_id: EndpointId, body: RefreshBody, principal: Writer) -> Accepted:
        """A standard isolation takes a new snapshot of the current allowlist (audited)."""
        return Accepted(
            request_id=await service.submit_refresh(endpoint_id, body.reason, principal)
        )

    @router.get(
        "/accounts/{account_id}/revocations/{revocation_id}",
        response_model=RevocationProgressView,
        responses={403: {"description": "Another account"}},
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
            raise RequestValidationError(
                [{"loc": ["query", "address"], "msg": str(exc), "type": "address.invalid"}]
            ) from exc
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

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_404_NOT_FOUND)

    async def forbidden(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_403_FORBIDDEN)

    async def conflict(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_409_CONFLICT)

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": f"temporarily unavailable ({type(exc).__name__}); retry"},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    app.add_exception_handler(EndpointNotFoundError, not_found)
    app.add_exception_handler(AccountForbiddenError, forbidden)
    app.add_exception_handler(StrictOverrideDeniedError, forbidden)
    app.add_exception_handler(RefreshNotAllowedError, conflict)
    for error in (ReplicaLagError, SettingsUnavailableError, KafkaError, RedisError, TimeoutError):
        app.add_exception_handler(error, unavailable)
