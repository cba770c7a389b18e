"""The agent API: enrollment, long-poll policy delivery, status reports, the signing key."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Literal

from aiokafka.errors import KafkaError
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    status,
)
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from services.enforcer import handlers
from services.enforcer.adapters.metrics import EnforcerMetrics
from services.enforcer.config import EnforcerSettings
from services.enforcer.domain import (
    AgentIdentity,
    AgentScopeError,
    EnrollmentKeyRejectedError,
    PolicyNotHeldError,
    StatusReportInvalidError,
    UnknownAgentTokenError,
)
from shared.auth import AUDIENCE_ENFORCER
from shared.config import ConfigError
from shared.http import AuthRefusedError, Scope, install_request_guards, token_policy

log = logging.getLogger(__name__)
router = APIRouter(tags=["agents"])
_bearer = HTTPBearer(auto_error=False)

AgentIdPath = Annotated[str, Path(min_length=1, max_length=128, description="The endpoint id.")]


class EnrollRequest(BaseModel):
    """An agent asks to enroll with its account's enrollment key."""

    model_config = ConfigDict(extra="forbid")

    account_id: str = Field(min_length=1, max_length=128, examples=["acct-1"])
    enrollment_key: str = Field(min_length=1, max_length=256)
    hostname: str = Field(min_length=1, max_length=255, examples=["web-01"])
    platform: Literal["linux", "windows", "macos"]


class EnrollResponse(BaseModel):
    """The endpoint id and the only copy of the agent's bearer token."""

    agent_id: str
    agent_token: str


class StatusReportRequest(BaseModel):
    """The agent's outcome for one policy sequence."""

    model_config = ConfigDict(extra="forbid")

    sequence: int = Field(ge=1)
    policy_id: str = Field(min_length=1, max_length=128)
    status: Literal["applied", "failed"]
    rules_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    detail: str = Field("", max_length=2000)


class StatusReportAccepted(BaseModel):
    """The report is on isolation.status.v1."""

    endpoint_id: str
    sequence: int
    status: str


class SigningKeyResponse(BaseModel):
    """The public key agents verify policies with."""

    key_id: str
    algorithm: Literal["Ed25519"] = "Ed25519"
    public_key: str = Field(description="Base64 of the raw 32-byte Ed25519 public key.")


# Async on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, which was two
# thread hops per agent request (about a tenth of the enforcer's CPU under load).
async def _deps(request: Request) -> handlers.EnforcerDeps:
    deps: handlers.EnforcerDeps = request.app.state.deps
    return deps


async def _metrics(request: Request) -> EnforcerMetrics:
    metrics: EnforcerMetrics = request.app.state.metrics
    return metrics


Deps = Annotated[handlers.EnforcerDeps, Depends(_deps)]
Metrics = Annotated[EnforcerMetrics, Depends(_metrics)]


async def current_agent(
    request: Request,
    agent_id: AgentIdPath,
    deps: Deps,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> AgentIdentity:
    """401 without a valid agent token; 403 when the token is another agent's."""
    checked = request.scope.get(AGENT_SCOPE_KEY)
    if isinstance(checked, AgentIdentity) and checked.agent_id == agent_id:
        # The auth gate already checked this token before the body was read (one Redis call).
        return checked
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing agent token (Authorization: Bearer <agent_token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        return await handlers.authenticate_agent(deps, credentials.credentials, agent_id)
    except UnknownAgentTokenError as exc:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail=str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from exc
    except AgentScopeError as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=str(exc)) from exc


CurrentAgent = Annotated[AgentIdentity, Depends(current_agent)]


@router.post("/v1/agents/enroll", status_code=status.HTTP_201_CREATED)
async def enroll(body: EnrollRequest, deps: Deps, metrics: Metrics) -> EnrollResponse:
    try:
        enrollment = await handlers.enroll_agent(
            deps,
            account_id=body.account_id,
            enrollment_key=body.enrollment_key,
            hostname=body.hostname,
            platform=body.platform,
        )
    except EnrollmentKeyRejectedError as exc:
        metrics.enrollments.labels("rejected").inc()
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=str(exc)) from exc
    metrics.enrollments.labels("ok").inc()
    return EnrollResponse(agent_id=enrollment.agent_id, agent_token=enrollment.agent_token)


@router.get(
    "/v1/agents/{agent_id}/policy",
    responses={
        200: {"description": "The newest signed policy with a sequence above `after`."},
        204: {"description": "No newer policy within `wait` seconds."},
    },
)
async def get_policy(
    request: Request,
    agent: CurrentAgent,
    deps: Deps,
    after: Annotated[int, Query(ge=0, description="Highest sequence the agent holds.")] = 0,
    wait: Annotated[float, Query(ge=0, description="Seconds to long-poll for a newer one.")] = 0,
) -> Response:
    settings: EnforcerSettings = request.app.state.settings
    if wait > settings.long_poll_max_s:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"wait: must be at most {settings.long_poll_max_s:g} seconds",
        )
    held = await handlers.wait_for_policy(deps, agent.agent_id, after=after, wait=wait)
    if held is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return Response(
        content=held.signed_json,
        media_type="application/json",
        headers={"X-Policy-Sequence": str(held.sequence)},
    )


@router.post("/v1/agents/{agent_id}/policy-status", status_code=status.HTTP_202_ACCEPTED)
async def post_policy_status(
    body: StatusReportRequest, agent: CurrentAgent, deps: Deps, metrics: Metrics
) -> StatusReportAccepted:
    try:
        report = await handlers.report_policy_status(
            deps,
            agent,
            sequence=body.sequence,
            policy_id=body.policy_id,
            status=body.status,
            rules_sha256=body.rules_sha256,
            detail=body.detail,
        )
    except StatusReportInvalidError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    except PolicyNotHeldError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    metrics.status_reports.labels(report.status).inc()
    return StatusReportAccepted(
        endpoint_id=report.endpoint_id, sequence=report.sequence, status=report.status
    )


@router.get("/v1/signing-key", tags=["keys"])
async def signing_key(deps: Deps, response: Response) -> SigningKeyResponse:
    signer = deps.signer
    if signer.dev_key:
        response.headers["X-Hostiso-Dev-Key"] = "true"
    return SigningKeyResponse(key_id=signer.key_id, public_key=signer.public_key_b64)


def _unavailable(detail: str) -> JSONResponse:
    return JSONResponse(
        {"detail": detail},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "1"},
    )


def install(app: FastAPI) -> None:
    """Mount the agent routes and map infrastructure failures to 503 (never a 500)."""
    app.include_router(router)

    @app.exception_handler(RedisError)
    async def _redis_down(request: Request, exc: RedisError) -> JSONResponse:
        log.warning("answered 503: redis error %r", exc, extra={"path": request.url.path})
        return _unavailable("the enforcer's store is unavailable; retry shortly")

    @app.exception_handler(KafkaError)
    async def _kafka_down(request: Request, exc: KafkaError) -> JSONResponse:
        log.warning("answered 503: kafka error %r", exc, extra={"path": request.url.path})
        return _unavailable("the event log is unavailable; retry shortly")

    @app.exception_handler(handlers.SignerNotReadyError)
    async def _not_ready(request: Request, exc: handlers.SignerNotReadyError) -> JSONResponse:
        return _unavailable("the enforcer is starting; retry shortly")


AGENT_SCOPE_KEY = "hostiso.agent"
_AGENT_ROUTE = re.compile(r"^/v1/agents/(?P<agent_id>[^/]+)/")


async def _gate_agent(scope: Scope, token: str) -> None:
    # Runs in the auth gate, before the body is received: an unknown token costs one lookup.
    match = _AGENT_ROUTE.match(scope["path"])
    if match is None:
        raise AuthRefusedError(401, "invalid agent token")
    deps: handlers.EnforcerDeps = scope["app"].state.deps
    try:
        scope[AGENT_SCOPE_KEY] = await handlers.authenticate_agent(deps, token, match["agent_id"])
    except UnknownAgentTokenError as exc:
        raise AuthRefusedError(401, str(exc)) from exc
    except AgentScopeError as exc:
        raise AuthRefusedError(403, str(exc)) from exc
    except RedisError as exc:
        log.warning("answered 503: redis error %r while checking an agent token", exc)
        raise AuthRefusedError(503, "the enforcer's store is unavailable; retry shortly") from exc


def install_guards(app: FastAPI, settings: EnforcerSettings) -> None:
    """413 over the body limit; agent routes need an agent token, checked before the body.

    Enrollment and the signing key are public; any other route needs a platform JWT for
    ``hostiso-enforcer`` (refused outright when no ``HOSTISO_JWT_SECRET`` is configured).
    """
    try:
        policy = token_policy(settings, AUDIENCE_ENFORCER)
    except ConfigError:
        policy = None
    install_request_guards(
        app,
        token_policy=policy,
        public_routes=[("POST", "/v1/agents/enroll"), ("GET", "/v1/signing-key")],
        other_authenticators=[(_AGENT_ROUTE, _gate_agent)],
        max_body_bytes=settings.http_max_body_bytes,
    )
