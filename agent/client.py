"""HTTP client of the enforcer's agent API (contracts.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import httpx
from pydantic import ValidationError

from shared.messages import SignedPolicy


class EnforcerUnavailableError(Exception):
    """The enforcer did not answer usably (network error, 5xx, timeout); retry with backoff."""


class AgentUnknownError(Exception):
    """The enforcer does not accept our agent id or token any more (401/403/404): enroll again."""


class EnrollmentRefusedError(Exception):
    """The enforcer refused enrollment (bad enrollment key or request); retrying will not help."""


class ReportRefusedError(Exception):
    """The enforcer answered 4xx to a status report: the same body will never be accepted."""


class UnreadablePolicyError(Exception):
    """A 200 answer to a poll whose body is not a SignedPolicy: nothing in it can be trusted."""


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

    def __init__(self, base_url: str, http: httpx.AsyncClient) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http

    async def _request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        json: dict[str, object] | None = None,
        params: dict[str, int | float] | None = None,
    ) -> httpx.Response:
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
        if response.status_code >= 500 or response.status_code == 429:
            raise EnforcerUnavailableError(f"{method} {path}: HTTP {response.status_code}")
        return response

    async def enroll(
        self, *, account_id: str, enrollment_key: str, hostname: str, platform: str
    ) -> Enrollment:
        response = await self._request(
            "POST",
            "/v1/agents/enroll",
            json={
                "account_id": account_id,
                "enrollment_key": enrollment_key,
                "hostname": hostname,
                "platform": platform,
            },
        )
        if response.status_code >= 400:
            raise EnrollmentRefusedError(f"HTTP {response.status_code}: {response.text[:500]}")
        body = response.json()
        return Enrollment(agent_id=str(body["agent_id"]), agent_token=str(body["agent_token"]))

    async def signing_key(self) -> str:
        response = await self._request("GET", "/v1/signing-key")
        if response.status_code != 200:
            raise EnforcerUnavailableError(f"GET /v1/signing-key: HTTP {response.status_code}")
        body = response.json()
        if body.get("algorithm") != "Ed25519":
            raise EnforcerUnavailableError(f"signing key algorithm {body.get('algorithm')!r}")
        return str(body["public_key"])

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
            raise AgentUnknownError(f"poll: HTTP {response.status_code}")
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
            raise AgentUnknownError(f"report: HTTP {response.status_code}")
        if response.status_code >= 400:
            raise ReportRefusedError(f"HTTP {response.status_code}: {response.text[:300]}")
