"""HTTP client of the enforcer's agent API (contracts.md)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol

import httpx
from pydantic import ValidationError

from shared.messages import SignedPolicy


class HttpAnswer(Protocol):
    """What the client reads of an answer (``httpx.Response``, ``agent.lighthttp.LightResponse``)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Looked up by lower-case name (httpx's are case-insensitive, the light client's lower)."""
        ...

    @property
    def content(self) -> bytes: ...

    @property
    def text(self) -> str: ...

    def json(self, **kwargs: Any) -> Any: ...


class HttpRequester(Protocol):
    """``httpx.AsyncClient`` (the real agent) or ``agent.lighthttp.LightHttpClient`` (simulated)."""

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        timeout: float,
        json: Any,
        params: Mapping[str, int | float] | None,
    ) -> HttpAnswer: ...


# Seconds an enrollment may take before the agent gives up and retries. Longer than the other
# calls' 10 s: the enforcer finishes an enrollment whose caller has gone (the endpoint is on
# endpoints.v1 before the answer), so giving up early under a fleet-wide burst leaves an orphan
# endpoint per retry and adds work to the very queue that was late (issue 14).
ENROLL_TIMEOUT_S = 30.0


class EnforcerUnavailableError(Exception):
    """The enforcer did not answer usably (network error, 5xx, 429, timeout); retry with backoff.

    ``retry_after``: the seconds a 503 or 429 answer's ``Retry-After`` asked for (None if it had
    none or an unreadable one); :class:`agent.loop.Backoff` bounds it.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# A Retry-After longer than this is not read as a number (its bound is the backoff's cap anyway).
_RETRY_AFTER_MAX_CHARS = 64


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (RFC 9110 §10.2.3: delta-seconds or an
    HTTP-date); None when absent or unreadable. A date in the past is 0. Not bounded here."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > _RETRY_AFTER_MAX_CHARS:
        return None
    if value.isascii() and value.isdigit():
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None  # not an HTTP-date (those are GMT)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class AgentRejectedError(Exception):
    """The enforcer (or whoever answered) said 401/403/404 to our agent id or token.

    An alarm, never proof: anyone on the path can answer 401. The rules in force stay; the
    agent retries with backoff and only re-enrolls, as the same endpoint, after repeated ones.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class PlainHttpRefusedError(Exception):
    """The enrollment key would go over plain http outside dev mode."""


class EnrollmentRefusedError(Exception):
    """The enforcer refused enrollment (bad enrollment key or request); retrying will not help."""


class ReportRefusedError(Exception):
    """The enforcer answered 4xx to a status report: the same body will never be accepted."""


class UnreadablePolicyError(Exception):
    """A 200 answer to a poll whose body is not a SignedPolicy: nothing in it can be trusted."""


class UsageRefusedError(Exception):
    """The enforcer answered 4xx to a usage report (409: not the held sequence)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Enrollment:
    agent_id: str
    agent_token: str


@dataclass(frozen=True)
class StatusReport:
    """Body of ``POST /v1/agents/{id}/policy-status``."""

    sequence: int
    policy_id: str
    status: Literal["applied", "failed"]
    rules_sha256: str | None
    detail: str

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> StatusReport:
        return cls(
            sequence=int(body["sequence"]),
            policy_id=str(body["policy_id"]),
            status="applied" if body["status"] == "applied" else "failed",
            rules_sha256=body.get("rules_sha256"),
            detail=str(body.get("detail", "")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "policy_id": self.policy_id,
            "status": self.status,
            "rules_sha256": self.rules_sha256,
            "detail": self.detail[:2000],
        }


class EnforcerClient:
    """Enroll, fetch the signing key, long-poll for policies, report status."""

    def __init__(
        self,
        base_url: str,
        http: HttpRequester,
        *,
        allow_plain_http: bool = False,
        enrollment_gate: asyncio.Semaphore | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http
        # Dev mode only: the enrollment key is a secret, it never goes over plain http otherwise.
        self.allow_plain_http = allow_plain_http
        # Shared by the agents of one process (simulated fleets): at most that many enrollment
        # calls in flight. Taken before the request's timeout starts, so waiting for the gate
        # never times an enrollment out.
        self.enrollment_gate = enrollment_gate

    def _gate(self) -> contextlib.AbstractAsyncContextManager[None]:
        if self.enrollment_gate is None:
            return contextlib.nullcontext()
        return self.enrollment_gate

    @property
    def verified_channel(self) -> bool:
        """The enforcer is reached over https (httpx verifies it against the configured CA)."""
        return self.base_url.startswith("https://")

    async def _request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        json: dict[str, object] | None = None,
        params: dict[str, int | float] | None = None,
    ) -> HttpAnswer:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = await self.http.request(
                method,
                self.base_url + path,
                headers=headers,
                timeout=timeout,
                json=json,
                params=params,
            )
        except httpx.HTTPError as exc:
            raise EnforcerUnavailableError(f"{method} {path}: {exc!r}") from exc
        status = response.status_code
        if status >= 500 or status == 429:
            retry_after = (
                parse_retry_after(response.headers.get("retry-after"))
                if status in (429, 503)
                else None
            )
            raise EnforcerUnavailableError(f"{method} {path}: HTTP {status}", retry_after)
        return response

    async def enroll(
        self,
        *,
        account_id: str,
        enrollment_key: str,
        hostname: str,
        platform: str,
        endpoint_id: str | None = None,
    ) -> Enrollment:
        """``endpoint_id``: re-enrolling as the endpoint we already are (the enforcer keeps it)."""
        if not self.verified_channel and not self.allow_plain_http:
            raise PlainHttpRefusedError(
                f"enrollment: refusing to send the enrollment key to {self.base_url} over plain"
                " http outside dev mode"
            )
        body: dict[str, object] = {
            "account_id": account_id,
            "enrollment_key": enrollment_key,
            "hostname": hostname,
            "platform": platform,
        }
        if endpoint_id is not None:
            body["endpoint_id"] = endpoint_id
        async with self._gate():
            response = await self._request(
                "POST", "/v1/agents/enroll", json=body, timeout=ENROLL_TIMEOUT_S
            )
        if response.status_code >= 400:
            raise EnrollmentRefusedError(f"HTTP {response.status_code}: {response.text[:500]}")
        try:
            answer = response.json()
            agent_id, agent_token = answer["agent_id"], answer["agent_token"]
        except (ValueError, TypeError, KeyError) as exc:
            raise EnforcerUnavailableError("enrollment: unreadable answer") from exc
        if not isinstance(agent_id, str) or not isinstance(agent_token, str):
            raise EnforcerUnavailableError("enrollment: agent_id/agent_token are not strings")
        if not agent_id or not agent_token:
            raise EnforcerUnavailableError("enrollment: empty agent_id/agent_token")
        return Enrollment(agent_id=agent_id, agent_token=agent_token)

    async def signing_key(self) -> str:
        """Only for the dev-mode pin at the first enrollment; never to replace a key."""
        async with self._gate():
            response = await self._request("GET", "/v1/signing-key")
        if response.status_code != 200:
            raise EnforcerUnavailableError(f"GET /v1/signing-key: HTTP {response.status_code}")
        try:
            body = response.json()
            algorithm, public_key = body.get("algorithm"), body["public_key"]
        except (ValueError, AttributeError, KeyError) as exc:
            raise EnforcerUnavailableError("GET /v1/signing-key: unreadable answer") from exc
        if algorithm != "Ed25519" or not isinstance(public_key, str):
            raise EnforcerUnavailableError(f"signing key algorithm {algorithm!r}")
        return public_key

    async def poll_policy(
        self, enrollment: Enrollment, *, after: int, wait: float
    ) -> SignedPolicy | None:
        response = await self._request(
            "GET",
            f"/v1/agents/{enrollment.agent_id}/policy",
            token=enrollment.agent_token,
            params={"after": after, "wait": wait},
            timeout=wait + 10.0,
        )
        if response.status_code == 204:
            return None
        if response.status_code in (401, 403, 404):
            raise AgentRejectedError(f"poll: HTTP {response.status_code}", response.status_code)
        if response.status_code != 200:
            raise EnforcerUnavailableError(f"poll: HTTP {response.status_code}")
        try:
            return SignedPolicy.model_validate_json(response.content)
        except ValidationError as exc:
            raise UnreadablePolicyError(f"{exc.error_count()} invalid field(s)") from exc

    async def report(self, enrollment: Enrollment, report: StatusReport) -> None:
        response = await self._request(
            "POST",
            f"/v1/agents/{enrollment.agent_id}/policy-status",
            token=enrollment.agent_token,
            json=report.to_json(),
        )
        if response.status_code in (401, 403, 404):
            raise AgentRejectedError(f"report: HTTP {response.status_code}", response.status_code)
        if response.status_code >= 400:
            raise ReportRefusedError(f"HTTP {response.status_code}: {response.text[:300]}")

    async def report_usage(self, enrollment: Enrollment, body: dict[str, Any]) -> None:
        """``POST /v1/agents/{id}/usage``: the allowlist's usage deltas of the held sequence."""
        response = await self._request(
            "POST",
            f"/v1/agents/{enrollment.agent_id}/usage",
            token=enrollment.agent_token,
            json=body,
        )
        if response.status_code in (401, 403, 404):
            raise AgentRejectedError(f"usage: HTTP {response.status_code}", response.status_code)
        if response.status_code >= 400:
            raise UsageRefusedError(
                f"usage: HTTP {response.status_code}: {response.text[:300]}", response.status_code
            )
