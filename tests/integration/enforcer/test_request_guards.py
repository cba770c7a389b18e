"""Enforcer HTTP hygiene: the public enrollment body is bounded; agent tokens are checked first."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from tests.integration.enforcer.conftest import enroll
from tests.integration.guards import (
    LIMIT,
    assert_problem,
    post_bad_json_unauthenticated,
    post_chunked_oversize,
    post_declared_oversize,
)

Running = tuple[FastAPI, httpx.AsyncClient]
ENROLL = "/v1/agents/enroll"
HUGE = 200 * 1024 * 1024


async def test_a_huge_declared_enrollment_body_gets_413_without_being_read(
    enforcer: Running,
) -> None:
    # Finding: a 200 MiB unauthenticated enrollment body was read whole (about 1 GiB of RSS).
    _, http = enforcer
    response = await http.post(
        ENROLL,
        content=b"",
        headers={"Content-Length": str(HUGE), "Content-Type": "application/json"},
    )
    assert_problem(response, 413, f"at most {LIMIT} bytes")
    response, body = await post_declared_oversize(http, ENROLL)
    assert_problem(response, 413)
    assert body.pulled == 0


async def test_a_huge_chunked_enrollment_body_is_cut_at_the_limit(enforcer: Running) -> None:
    _, http = enforcer
    response, body = await post_chunked_oversize(http, ENROLL, HUGE)
    assert_problem(response, 413, "request body")
    assert body.pulled <= LIMIT + body.chunk, f"the server read {body.pulled} bytes"


async def test_an_agent_route_checks_the_token_before_the_body(enforcer: Running) -> None:
    _, http = enforcer
    agent = await enroll(http, "acct-guard")
    path = f"/v1/agents/{agent.agent_id}/policy-status"
    response, body = await post_bad_json_unauthenticated(http, path)
    assert_problem(response, 401, "missing bearer token")
    assert response.headers["www-authenticate"] == "Bearer"
    assert body.pulled == 0
    response, body = await post_bad_json_unauthenticated(
        http, path, {"Authorization": "Bearer not-an-agent-token"}
    )
    assert_problem(response, 401, "invalid agent token")
    assert body.pulled == 0
    other = await enroll(http, "acct-guard")
    response, body = await post_bad_json_unauthenticated(http, path, other.auth)
    assert_problem(response, 401, "invalid agent token")
    assert body.pulled == 0


async def test_an_agent_route_with_its_token_still_parses_and_bounds_the_body(
    enforcer: Running,
) -> None:
    _, http = enforcer
    agent = await enroll(http, "acct-guard")
    path = f"/v1/agents/{agent.agent_id}/policy-status"
    bad_json = await http.post(
        path, content=b"{", headers={**agent.auth, "Content-Type": "application/json"}
    )
    assert bad_json.status_code == 400, "with a valid token the body is parsed as before"
    response, body = await post_chunked_oversize(http, path, 1024 * 1024, agent.auth)
    assert_problem(response, 413)
    assert body.pulled <= LIMIT + body.chunk
    assert (await agent.poll()).status_code == 204


async def test_enrollment_and_the_signing_key_stay_public(enforcer: Running) -> None:
    _, http = enforcer
    assert (await http.get("/v1/signing-key")).status_code == 200
    await enroll(http, "acct-guard")
    assert (await http.get("/v1/anything-else")).status_code == 404
