"""The agent API (enrollment, long-poll delivery, status reports, the signing key) and the
enrollment-key routes users call with their JWT."""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Annotated, Any, Literal

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
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from redis.exceptions import RedisClusterException, RedisError

from services.enforcer import fastpath, handlers, presence
from services.enforcer.adapters.metrics import EnforcerMetrics
from services.enforcer.config import EnforcerSettings
from services.enforcer.domain import (
    AccountAccessDeniedError,
    AgentIdentity,
    EndpointLimitReachedError,
    EndpointOfAnotherAccountError,
    EnrollmentConflictError,
    EnrollmentKeyNotFoundError,
    EnrollmentKeyRecord,
    EnrollmentKeyRejectedError,
    EnrollmentRateLimitedError,
    PolicyNotHeldError,
    StatusReportInvalidError,
    UnknownAgentTokenError,
)
from services.enforcer.fastpath import AGENT_SCOPE_KEY, AGENT_TOKEN_KEY
from shared.auth import AUDIENCE_ENFORCER, CurrentPrincipal
from shared.config import ConfigError
from shared.http import AuthRefusedError, Scope, install_request_guards, token_policy
from shared.messages import AllowlistUsage, SignedPolicy
from shared.problems import ErrorMapping, InputRejectedError, ProblemKind

log = logging.getLogger(__name__)
router = APIRouter(tags=["agents"])
_bearer = HTTPBearer(auto_error=False)

AgentIdPath = Annotated[str, Path(min_length=1, max_length=128, description="The endpoint id.")]
# The settings service's account id rule; it also keeps '{' and '}' out of the hash-tagged keys.
ACCOUNT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"
ENDPOINT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
AccountIdPath = Annotated[
    str,
    Path(
        pattern=ACCOUNT_ID_PATTERN,
        description="Account id: letters, digits, '.', '_', '@', '-' (at most 128).",
        examples=["acct-1"],
    ),
]
KeyIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$", description="The key id (16 hex).")]


class EnrollRequest(BaseModel):
    """An agent asks to enroll (or re-enroll its endpoint id) with its account's enrollment key."""

    # Strict: 0 is not false and "3" is not 3, as the OpenAPI schema says (schemathesis checks).
    model_config = ConfigDict(extra="forbid", strict=True)

    account_id: str = Field(pattern=ACCOUNT_ID_PATTERN, examples=["acct-1"])
    enrollment_key: str = Field(
        min_length=1,
        max_length=256,
        pattern=r"^[\x21-\x7e]+$",
        description="The account's enrollment key (printable ASCII, no spaces).",
        examples=["hek_<key_id>_<secret>"],
    )
    hostname: str = Field(min_length=1, max_length=255, examples=["web-01"])
    platform: Literal["linux", "windows", "macos"]
    endpoint_id: str | None = Field(
        None,
        pattern=ENDPOINT_ID_PATTERN,
        description="Re-enrollment: the endpoint id the agent already has. The answer names this"
        " id; the previous token of the endpoint stops working, its desired policy stays.",
    )


class EnrollResponse(BaseModel):
    """The endpoint id and the only copy of the agent's bearer token."""

    agent_id: str
    agent_token: str


class EnrollmentKeyView(BaseModel):
    """One enrollment key's metadata (the key itself is shown only once, when it is issued)."""

    key_id: str
    account_id: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    active: bool

    @classmethod
    def of(cls, record: EnrollmentKeyRecord) -> EnrollmentKeyView:
        return cls(
            key_id=record.key_id,
            account_id=record.account_id,
            created_at=datetime.fromisoformat(record.created_at),
            created_by=record.created_by,
            revoked_at=None
            if record.revoked_at is None
            else datetime.fromisoformat(record.revoked_at),
            active=record.active,
        )


class EnrollmentKeyList(BaseModel):
    """Every key the account was issued, oldest first; at most one is active."""

    account_id: str
    items: list[EnrollmentKeyView]


class IssuedEnrollmentKeyView(EnrollmentKeyView):
    """A new key: its only copy, and the earlier keys the rotation revoked."""

    enrollment_key: str = Field(description="Shown once; only its SHA-256 is stored.")
    revoked_key_ids: list[str]


class StatusReportRequest(BaseModel):
    """The agent's outcome for one policy sequence."""

    # Strict: 0 is not false and "3" is not 3, as the OpenAPI schema says (schemathesis checks).
    model_config = ConfigDict(extra="forbid", strict=True)

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


class UsageCounter(BaseModel):
    """Traffic one allowed entry let through since the agent's previous report (deltas)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    address: str = Field(
        min_length=1, max_length=64, description="The entry's address or prefix, as in the policy."
    )
    ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=list, max_length=16, description="The entry's ports (empty: every port)."
    )
    protocol: Literal["tcp", "udp", "any"] = "any"
    packets: int = Field(ge=0, le=2**63 - 1, description="Packets since the previous report.")
    bytes: int = Field(ge=0, le=2**63 - 1, description="Bytes since the previous report.")
    # Not strict: a JSON body carries the time as an RFC 3339 string.
    last_seen: AwareDatetime | None = Field(
        None,
        strict=False,
        description="When the agent last saw the count rise (RFC 3339 with offset).",
    )


class UsageReportRequest(BaseModel):
    """The agent's usage counters of the policy it holds (deltas per allowed entry)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    sequence: int = Field(ge=1, description="The sequence of the policy in force counted.")
    counters: list[UsageCounter] = Field(max_length=100, description="At most 100 entries.")


class UsageReportAccepted(BaseModel):
    """The counters are on isolation.status.v1."""

    endpoint_id: str
    sequence: int
    counters: int


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
    """401 without the agent's own valid token (another agent's token is not valid here)."""
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


CurrentAgent = Annotated[AgentIdentity, Depends(current_agent)]


_UNAVAILABLE = ProblemKind(
    503,
    "Temporarily unavailable",
    "the enforcer's store or event log is unavailable; retry shortly",
    retry_after=1,
    log_level=logging.WARNING,
)
# Every error a route may raise and how it answers (RFC 9457, shared.problems).
ERRORS = ErrorMapping(
    {
        EnrollmentRateLimitedError: ProblemKind(
            429,
            "Too many enrollment attempts",
            "Too many enrollment attempts for the account; see Retry-After",
            "body.account_id",
            "enrollment_rate",
        ),
        EnrollmentKeyRejectedError: ProblemKind(
            403,
            "Enrollment key refused",
            "Enrollment key not active for the account",
            "body.enrollment_key",
            "active_key",
        ),
        EndpointOfAnotherAccountError: ProblemKind(
            403,
            "Endpoint of another account",
            "The endpoint id is enrolled in another account",
            "body.endpoint_id",
            "same_account",
        ),
        EndpointLimitReachedError: ProblemKind(
            403,
            "Endpoint limit reached",
            "The account's endpoint limit is reached",
            "body.account_id",
            "max_endpoints",
        ),
        EnrollmentConflictError: ProblemKind(
            409,
            "Concurrent enrollment",
            "The endpoint id was re-created by a concurrent enrollment; retry",
            "body.endpoint_id",
            "concurrent",
        ),
        AccountAccessDeniedError: ProblemKind(
            403, "Forbidden", "A partner token for another account", "path.account_id", "forbidden"
        ),
        EnrollmentKeyNotFoundError: ProblemKind(
            404, "Not found", "No such key in the account", "path.key_id", "exists"
        ),
        PolicyNotHeldError: ProblemKind(
            409,
            "Policy not held",
            "The report names a policy that is not the desired one",
            rule="held",
        ),
        StatusReportInvalidError: ProblemKind(
            422, "Invalid input", "The report contradicts itself", rule="consistent"
        ),
        handlers.SignerNotReadyError: ProblemKind(
            503, "Starting", "the enforcer is starting; retry shortly", retry_after=1
        ),
        RedisError: _UNAVAILABLE,
        # e.g. no reachable cluster node, or a slot moving during a failover: not a RedisError.
        RedisClusterException: _UNAVAILABLE,
        KafkaError: _UNAVAILABLE,
    },
    fields={
        "sequence": "body.sequence",
        "policy_id": "body.policy_id",
        "rules_sha256": "body.rules_sha256",
        "detail": "body.detail",
    },
    everywhere=(RedisError, RedisClusterException),
)

# Each refusal of enrollment and the outcome it counts.
_ENROLL_METRIC: dict[type[Exception], str | None] = {
    EnrollmentRateLimitedError: "rate_limited",
    EnrollmentKeyRejectedError: "rejected",
    EndpointOfAnotherAccountError: "rejected",
    EndpointLimitReachedError: "limit_reached",
    EnrollmentConflictError: None,
}
_ENROLL_REFUSALS_TYPES = tuple(_ENROLL_METRIC)
_ENROLL_ERRORS = ERRORS.responses(*_ENROLL_REFUSALS_TYPES)


@router.post("/v1/agents/enroll", status_code=status.HTTP_201_CREATED, responses=_ENROLL_ERRORS)
async def enroll(body: EnrollRequest, deps: Deps, metrics: Metrics) -> EnrollResponse:
    try:
        enrollment = await handlers.enroll_agent(
            deps,
            account_id=body.account_id,
            enrollment_key=body.enrollment_key,
            hostname=body.hostname,
            platform=body.platform,
            endpoint_id=body.endpoint_id,
        )
    except _ENROLL_REFUSALS_TYPES as exc:
        outcome = next(m for t, m in _ENROLL_METRIC.items() if isinstance(exc, t))
        if outcome:
            metrics.enrollments.labels(outcome).inc()
        raise  # answered by ERRORS
    metrics.enrollments.labels("reenrolled" if body.endpoint_id else "ok").inc()
    return EnrollResponse(agent_id=enrollment.agent_id, agent_token=enrollment.agent_token)


@router.get(
    "/v1/agents/{agent_id}/policy",
    responses={
        200: {
            "model": SignedPolicy,
            "description": "The newest signed policy with a sequence above `after`.",
            "headers": {
                "X-Policy-Sequence": {
                    "description": "The policy's sequence.",
                    "schema": {"type": "integer"},
                }
            },
        },
        204: {"description": "No newer policy within `wait` seconds."},
        **ERRORS.responses(),
    },
)
async def get_policy(
    request: Request,
    agent_id: AgentIdPath,
    deps: Deps,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    after: Annotated[int, Query(ge=0, description="Highest sequence the agent holds.")] = 0,
    wait: Annotated[float, Query(ge=0, description="Seconds to long-poll for a newer one.")] = 0,
) -> Response:
    settings: EnforcerSettings = request.app.state.settings
    if wait > settings.long_poll_max_s:
        raise InputRejectedError(
            "query.wait", "le", f"must be at most {settings.long_poll_max_s:g} seconds"
        )
    # The gate left the token to this route: one Redis round trip checks it with the cursor.
    token = request.scope.get(AGENT_TOKEN_KEY)
    if not isinstance(token, str):
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="missing agent token (Authorization: Bearer <agent_token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        token = credentials.credentials
    try:
        held = await handlers.poll_policy(deps, token, agent_id, after=after, wait=wait)
    except UnknownAgentTokenError as exc:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail=str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from exc
    # After the token checked out: a wrong token on a known id must not publish last_seen.
    presence.note_poll(request, agent_id)
    if held is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    body, coding = held.encoded_for(request.headers.get("accept-encoding", ""))
    headers = {"X-Policy-Sequence": str(held.sequence), "Vary": "Accept-Encoding"}
    if coding is not None:
        headers["Content-Encoding"] = coding
    return Response(content=body, media_type="application/json", headers=headers)


@router.post(
    "/v1/agents/{agent_id}/policy-status",
    status_code=status.HTTP_202_ACCEPTED,
    # Declared here, answered as bytes below: every isolation ends with this route, and
    # FastAPI re-validating its own three-field answer cost more than the rest of the route.
    response_model=StatusReportAccepted,
    responses=ERRORS.responses(PolicyNotHeldError, StatusReportInvalidError),
)
async def post_policy_status(
    body: StatusReportRequest, agent: CurrentAgent, deps: Deps, metrics: Metrics
) -> Response:
    report = await handlers.report_policy_status(
        deps,
        agent,
        sequence=body.sequence,
        policy_id=body.policy_id,
        status=body.status,
        rules_sha256=body.rules_sha256,
        detail=body.detail,
    )
    metrics.status_reports.labels(report.status).inc()
    accepted = StatusReportAccepted(
        endpoint_id=report.endpoint_id, sequence=report.sequence, status=report.status
    )
    return Response(
        accepted.model_dump_json().encode(),
        status_code=status.HTTP_202_ACCEPTED,
        media_type="application/json",
    )


@router.post(
    "/v1/agents/{agent_id}/usage",
    status_code=status.HTTP_202_ACCEPTED,
    responses=ERRORS.responses(PolicyNotHeldError),
)
async def post_usage(
    body: UsageReportRequest, agent: CurrentAgent, deps: Deps
) -> UsageReportAccepted:
    """The agent's counters of traffic its allowlist let through (DESIGN §4); 409 unless the
    sequence is the endpoint's held policy."""
    message = await handlers.report_usage(
        deps,
        agent,
        sequence=body.sequence,
        counters=tuple(
            AllowlistUsage(
                address=c.address,
                ports=tuple(c.ports),
                protocol=c.protocol,
                packets=c.packets,
                bytes=c.bytes,
                last_seen=c.last_seen,
            )
            for c in body.counters
        ),
    )
    return UsageReportAccepted(
        endpoint_id=message.endpoint_id, sequence=message.sequence, counters=len(message.counters)
    )


@router.get("/v1/signing-key", tags=["keys"])
async def signing_key(deps: Deps, response: Response) -> SigningKeyResponse:
    signer = deps.signer
    if signer.dev_key:
        response.headers["X-Hostiso-Dev-Key"] = "true"
    return SigningKeyResponse(key_id=signer.key_id, public_key=signer.public_key_b64)


# --- enrollment keys (user JWT, as the settings routes) ---------------------------------

keys_router = APIRouter(
    prefix="/v1/accounts/{account_id}/enrollment-keys", tags=["enrollment keys"]
)

_KEY_ERRORS = ERRORS.responses(AccountAccessDeniedError)


def _key_admin(action: str) -> Any:
    # Authorised before anything else is read, so a partner learns nothing about another account.
    async def dependency(account_id: AccountIdPath, principal: CurrentPrincipal, deps: Deps) -> str:
        await handlers.authorize_key_admin(deps, principal, account_id, action)
        return account_id

    return Depends(dependency)


@keys_router.get("", responses=_KEY_ERRORS)
async def list_enrollment_keys(
    deps: Deps, account_id: Annotated[str, _key_admin("enrollment_key.list")]
) -> EnrollmentKeyList:
    """Metadata of every key the account was issued (never a key or its hash)."""
    records = await handlers.list_enrollment_keys(deps, account_id)
    return EnrollmentKeyList(
        account_id=account_id, items=[EnrollmentKeyView.of(r) for r in records]
    )


@keys_router.post("", status_code=status.HTTP_201_CREATED, responses=_KEY_ERRORS)
async def rotate_enrollment_key(
    deps: Deps,
    principal: CurrentPrincipal,
    response: Response,
    account_id: Annotated[str, _key_admin("enrollment_key.rotate")],
) -> IssuedEnrollmentKeyView:
    """Issue a new key (shown only in this answer) and revoke every earlier one.

    Agents that enrolled with an earlier key keep working: their tokens do not depend on it.
    """
    issued = await handlers.rotate_enrollment_key(deps, principal, account_id)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Location"] = (
        f"/v1/accounts/{account_id}/enrollment-keys/{issued.record.key_id}"
    )
    return IssuedEnrollmentKeyView(
        **EnrollmentKeyView.of(issued.record).model_dump(),
        enrollment_key=issued.enrollment_key,
        revoked_key_ids=issued.revoked_key_ids,
    )


@keys_router.delete(
    "/{key_id}",
    responses=ERRORS.responses(AccountAccessDeniedError, EnrollmentKeyNotFoundError),
)
async def revoke_enrollment_key(
    deps: Deps,
    principal: CurrentPrincipal,
    key_id: KeyIdPath,
    account_id: Annotated[str, _key_admin("enrollment_key.revoke")],
) -> EnrollmentKeyView:
    """Refuse the key for new enrollments from now on (idempotent)."""
    record = await handlers.revoke_enrollment_key(deps, principal, account_id, key_id)
    return EnrollmentKeyView.of(record)


def install(app: FastAPI) -> None:
    """Mount the agent routes and map named and infrastructure errors (never a 500).

    The poll and the report answer their happy path in ``fastpath`` (same answers, without
    FastAPI's per-request work), in front of their routes here, which answer everything else.
    """
    app.include_router(router)
    app.include_router(keys_router)
    fastpath.install(app)
    ERRORS.install(app)


_AGENT_ROUTE = re.compile(r"^/v1/agents/(?P<agent_id>[^/]+)/")
_POLL_ROUTE = re.compile(r"^/v1/agents/[^/]+/policy$")


async def _gate_agent(scope: Scope, token: str) -> None:
    # Runs in the auth gate, before the body is received: an unknown token costs one lookup.
    match = _AGENT_ROUTE.match(scope["path"])
    if match is None:
        raise AuthRefusedError(401, "invalid agent token")
    if scope["method"] == "GET" and _POLL_ROUTE.match(scope["path"]):
        # The poll has no body; its route checks the token in the same round trip as the cursor.
        scope[AGENT_TOKEN_KEY] = token
        return
    deps: handlers.EnforcerDeps = scope["app"].state.deps
    try:
        scope[AGENT_SCOPE_KEY] = await handlers.authenticate_agent(deps, token, match["agent_id"])
    except UnknownAgentTokenError as exc:
        raise AuthRefusedError(401, str(exc)) from exc
    except (RedisError, RedisClusterException) as exc:
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
