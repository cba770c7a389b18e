"""Isolation HTTP hygiene: 413 before reading an oversized body, 401 before parsing one."""

from __future__ import annotations

from shared.auth import (
    AUDIENCE_SETTINGS,
    SCOPE_ALLOWLIST_WRITE,
    SCOPE_ISOLATION_READ,
    mint_token,
)
from shared.config import DEV_JWT_SECRET
from tests.integration.guards import (
    LIMIT,
    assert_problem,
    post_bad_json_unauthenticated,
    post_chunked_oversize,
    post_declared_oversize,
)
from tests.integration.isolation.conftest import Harness

ISOLATE = "/v1/endpoints/ep-guard/isolation"


async def test_a_declared_oversize_body_gets_413_without_being_read(h: Harness) -> None:
    response, body = await post_declared_oversize(h.http, ISOLATE, h.token())
    assert_problem(response, 413, f"at most {LIMIT} bytes")
    assert body.pulled == 0


async def test_a_chunked_oversize_body_is_cut_at_the_limit(h: Harness) -> None:
    response, body = await post_chunked_oversize(h.http, ISOLATE, 1024 * 1024, h.token())
    assert_problem(response, 413, "request body")
    assert body.pulled <= LIMIT + body.chunk


async def test_bad_json_without_a_token_gets_401_not_422(h: Harness) -> None:
    response, body = await post_bad_json_unauthenticated(h.http, ISOLATE)
    assert_problem(response, 401, "missing bearer token")
    assert response.headers["www-authenticate"] == "Bearer"
    assert body.pulled == 0


async def test_a_401_still_carries_cors_headers_for_the_portal(h: Harness) -> None:
    origin = "http://127.0.0.1:8001"
    response = await h.http.get("/v1/endpoints/ep-guard/isolation", headers={"Origin": origin})
    assert_problem(response, 401)
    assert response.headers.get("access-control-allow-origin") == origin


async def test_a_token_for_another_service_is_refused_naming_the_audience(h: Harness) -> None:
    settings_only = mint_token(DEV_JWT_SECRET, sub="x", role="soc", audience=[AUDIENCE_SETTINGS])
    response = await h.http.get(ISOLATE, headers={"Authorization": f"Bearer {settings_only}"})
    assert_problem(response, 401, "aud must include 'hostiso-isolation'")


async def test_a_service_token_needs_the_isolation_scope(h: Harness) -> None:
    def service(*scopes: str) -> dict[str, str]:
        token = mint_token(DEV_JWT_SECRET, sub="svc", role="service", scopes=scopes)
        return {"Authorization": f"Bearer {token}"}

    body = {"mode": "strict", "reason": "scope test"}
    refused = await h.http.post(ISOLATE, json=body, headers=service(SCOPE_ALLOWLIST_WRITE))
    assert refused.status_code == 403, refused.text
    assert "'isolation:write' scope" in refused.json()["detail"]
    reader = await h.http.post(ISOLATE, json=body, headers=service(SCOPE_ISOLATION_READ))
    assert reader.status_code == 403
    # A read with the read scope gets past auth (404: the endpoint is not enrolled).
    read = await h.http.get(ISOLATE, headers=service(SCOPE_ISOLATION_READ))
    assert read.status_code not in (401, 403), read.text
