"""The fast agent routes answer exactly what the FastAPI routes answer, valid input or not."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.enforcer import fastpath
from shared.messages import SignedPolicy
from shared.topics import Topics
from tests.helpers import wait_for
from tests.integration.enforcer.conftest import AgentClient, enroll, policy_command, send_command

Running = tuple[FastAPI, httpx.AsyncClient]
Call = Callable[[], Awaitable[httpx.Response]]


@pytest.fixture
def slow_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths the fast routes (when on) handed to their FastAPI route."""
    calls: list[str] = []
    original = fastpath._FastRoute.to_slow

    async def recorded(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if getattr(scope["app"].state, fastpath.ENABLED_STATE_KEY, True):
            calls.append(scope["path"])
        await original(self, scope, receive, send)

    monkeypatch.setattr(fastpath._FastRoute, "to_slow", recorded)
    yield calls


def _answer(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    return response.status_code, response.headers.multi_items(), response.content


async def same_answer(app: FastAPI, call: Call) -> httpx.Response:
    """The call's answer through the FastAPI route, then through the fast route: identical."""
    setattr(app.state, fastpath.ENABLED_STATE_KEY, False)
    try:
        slow = await call()
    finally:
        setattr(app.state, fastpath.ENABLED_STATE_KEY, True)
    fast = await call()
    assert _answer(fast) == _answer(slow)
    return fast


def poll(agent: AgentClient, query: str, **headers: str) -> Call:
    return lambda: agent.http.get(
        f"/v1/agents/{agent.agent_id}/policy?{query}", headers={**agent.auth, **headers}
    )


def report(agent: AgentClient, content: bytes, **headers: str) -> Call:
    return lambda: agent.http.post(
        f"/v1/agents/{agent.agent_id}/policy-status",
        content=content,
        headers={**agent.auth, "content-type": "application/json", **headers},
    )


async def test_poll_answers_as_the_fastapi_route(
    enforcer: Running, producer: Any, topics: Topics, slow_calls: list[str]
) -> None:
    app, http = enforcer
    agent, other = await enroll(http), await enroll(http)
    # Happy paths: answered by the fast route.
    for query in ("after=0&wait=0", "wait=0&after=0", "after=0", "wait=0.2", ""):
        assert (await same_answer(app, poll(agent, query))).status_code == 204
    assert slow_calls == []
    await send_command(producer, topics.enforcer_commands, policy_command(agent.agent_id, 1))
    first = await agent.poll(after=0, wait=20)
    assert first.status_code == 200
    for encoding in ("gzip", "identity", "br"):
        answered = await same_answer(
            app, poll(agent, "after=0&wait=0", **{"accept-encoding": encoding})
        )
        assert answered.headers["x-policy-sequence"] == "1"
        assert SignedPolicy.model_validate_json(answered.content).policy.sequence == 1
    assert (await same_answer(app, poll(agent, "after=1&wait=0"))).status_code == 204
    assert slow_calls == []
    # Unusual queries go to the FastAPI route, which answers them (valid or not).
    unusual = (
        "after=-1",
        "after=x",
        "after=",
        "after=1.0",
        "wait=-1",
        "wait=1e1",
        "wait=nan",
        "wait=100000",
        "after=0&after=1",
        "after=0&other=1",
        "after",
        "after=%31",
    )
    for query in unusual:
        await same_answer(app, poll(agent, query))
    assert len(slow_calls) == len(unusual)
    # Tokens: wrong, another agent's, none, an unknown agent.
    wrong = AgentClient(http, agent.agent_id, "not-a-token")
    foreign = AgentClient(http, agent.agent_id, other.token)
    unknown = AgentClient(http, "no-such-agent", agent.token)
    for caller in (wrong, foreign, unknown):
        assert (await same_answer(app, poll(caller, "after=0&wait=0"))).status_code == 401
    none = lambda: http.get(f"/v1/agents/{agent.agent_id}/policy")  # noqa: E731
    assert (await same_answer(app, none)).status_code == 401
    long_id = AgentClient(http, "a" * 129, agent.token)
    await same_answer(app, poll(long_id, "after=0"))
    for method in ("HEAD", "POST", "PUT"):
        other_method = lambda m=method: http.request(  # noqa: E731
            m, f"/v1/agents/{agent.agent_id}/policy", headers=agent.auth
        )
        assert (await same_answer(app, other_method)).status_code == 405
    metrics = (await http.get("/metrics")).text
    assert (
        'hostiso_http_requests_total{method="GET",route="/v1/agents/{agent_id}/policy",'
        'status="204"}' in metrics
    )


async def test_report_answers_as_the_fastapi_route(
    enforcer: Running, producer: Any, topics: Topics, slow_calls: list[str]
) -> None:
    app, http = enforcer
    agent, other = await enroll(http), await enroll(http)
    await send_command(producer, topics.enforcer_commands, policy_command(agent.agent_id, 1))
    signed = SignedPolicy.model_validate_json((await agent.poll(after=0, wait=20)).content)
    policy_id = signed.policy.policy_id
    applied = b'{"sequence":1,"policy_id":"%s","status":"applied","rules_sha256":"%s"}' % (
        policy_id.encode(),
        b"c" * 64,
    )
    # The happy path twice (a repeated report is accepted again), then other valid forms.
    valid = (
        applied,
        b'{"status":"applied","sequence":1,"policy_id":"%s","rules_sha256":"%s","detail":""}'
        % (policy_id.encode(), b"d" * 64),
        b'{"sequence":1,"policy_id":"%s","status":"failed","detail":"nft failed"}'
        % policy_id.encode(),
    )
    for body in valid:
        answered = await same_answer(app, report(agent, body))
        assert answered.status_code == 202, answered.text
    assert slow_calls == []
    # Refused by the handlers (same exceptions, same handlers): not held, inconsistent.
    refused = (
        b'{"sequence":9,"policy_id":"%s","status":"applied","rules_sha256":"%s"}'
        % (policy_id.encode(), b"c" * 64),
        b'{"sequence":1,"policy_id":"other","status":"applied","rules_sha256":"%s"}' % (b"c" * 64),
        b'{"sequence":1,"policy_id":"%s","status":"applied"}' % policy_id.encode(),
        b'{"sequence":1,"policy_id":"%s","status":"failed"}' % policy_id.encode(),
    )
    for body in refused:
        assert (await same_answer(app, report(agent, body))).status_code in (409, 422)
    assert slow_calls == []
    # Bodies the fast route does not take: the FastAPI route answers them.
    unusual = (
        b"{",
        b"",
        b"[]",
        b"null",
        b'{"sequence":"1","policy_id":"p","status":"applied"}',
        b'{"sequence":true,"policy_id":"p","status":"applied"}',
        b'{"sequence":1.0,"policy_id":"p","status":"applied"}',
        b'{"sequence":0,"policy_id":"p","status":"applied"}',
        b'{"sequence":1,"policy_id":"","status":"applied"}',
        b'{"sequence":1,"policy_id":"p","status":"done"}',
        b'{"sequence":1,"policy_id":"p","status":[]}',
        b'{"sequence":1,"policy_id":{},"status":"applied"}',
        b'{"sequence":1,"policy_id":"p","status":"applied","rules_sha256":1}',
        b'{"sequence":1,"policy_id":"p","status":"applied","detail":null}',
        b'{"sequence":1,"policy_id":"p","status":"applied","rules_sha256":"C"}',
        b'{"sequence":1,"policy_id":"p","status":"applied","detail":"' + b"x" * 2001 + b'"}',
        b'{"sequence":1,"policy_id":"p","status":"applied","extra":1}',
        b'{"sequence":1,"policy_id":"p"}',
        b'{"sequence":99999999999999999999999,"policy_id":"p","status":"applied"}',
        b'\xef\xbb\xbf{"sequence":1}',
        b'{"sequence":NaN}',
    )
    for body in unusual:
        answered = await same_answer(app, report(agent, body))
        assert answered.status_code in (400, 409, 422), (body, answered.text)
    assert len(slow_calls) == len(unusual)
    # Other content types, an oversize body, and tokens that are not this agent's.
    slow_calls.clear()
    await same_answer(app, report(agent, applied, **{"content-type": "text/plain"}))
    await same_answer(app, report(agent, applied, **{"content-type": "application/json; x=1"}))
    oversize = b'{"sequence":1,"policy_id":"p","status":"applied","detail":"%s"}' % (b"x" * 70_000)
    assert (await same_answer(app, report(agent, oversize))).status_code == 413
    chunked = lambda: http.post(  # noqa: E731  (no Content-Length: counted while received)
        f"/v1/agents/{agent.agent_id}/policy-status",
        content=_chunks(oversize),
        headers={**agent.auth, "content-type": "application/json"},
    )
    assert (await same_answer(app, chunked)).status_code == 413
    wrong = AgentClient(http, agent.agent_id, "not-a-token")
    foreign = AgentClient(http, agent.agent_id, other.token)
    unknown = AgentClient(http, "no-such-agent", agent.token)
    for caller in (wrong, foreign, unknown):
        assert (await same_answer(app, report(caller, applied))).status_code == 401
    metrics = (await http.get("/metrics")).text
    # Two applied bodies and the "json; x=1" one, each twice; the failed one twice.
    assert 'hostiso_enforcer_status_reports_total{status="applied"} 6.0' in metrics
    assert 'hostiso_enforcer_status_reports_total{status="failed"} 2.0' in metrics
    assert (
        'hostiso_http_requests_total{method="POST",route="/v1/agents/{agent_id}/policy-status",'
        'status="202"} 8.0' in metrics
    )


async def _chunks(body: bytes) -> Any:
    for start in range(0, len(body), 8192):
        yield body[start : start + 8192]


async def test_fast_poll_marks_the_agent_seen(enforcer: Running) -> None:
    app, http = enforcer
    agent = await enroll(http)
    assert (await agent.poll()).status_code == 204
    presence = app.state.presence
    await wait_for(lambda: presence.known_taken(agent.agent_id), message="poll marked seen")
