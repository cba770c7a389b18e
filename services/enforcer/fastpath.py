"""Pure-ASGI answers of the two agent routes every isolation goes through.

``GET /v1/agents/{agent_id}/policy`` (the long poll) and ``POST .../policy-status`` (the report)
are most of the enforcer's requests: 10,000 agents re-poll every minute and each isolation is a
poll answered, a report and a new poll. FastAPI's per-request work (dependency injection, the
query and body models, the response class) cost more than the route's own work, so these
routes answer their happy path here: same handlers, same answer bytes.

Each fast route sits in front of its FastAPI route, with the same path template (so the request
metrics and spans name the same route) and inside the app's middleware (the body limit, the
auth gate and the error handlers apply as they do to the FastAPI route). It hands any request it
is not sure of to the FastAPI route untouched (a query or body it would not accept as is, a
missing token, an unexpected content type), and raises the same errors the FastAPI route
raises, answered by the same exception handlers, so every error answer stays as it was.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from fastapi import FastAPI, HTTPException, status
from starlette.routing import Match, Route

from services.enforcer import handlers, presence
from services.enforcer.domain import AgentIdentity, UnknownAgentTokenError
from shared.http import Message, Receive, Scope, Send

POLL_PATH = "/v1/agents/{agent_id}/policy"
REPORT_PATH = "/v1/agents/{agent_id}/policy-status"
# The FastAPI routes' own limits (``AgentIdPath``; ``StatusReportRequest``).
_MAX_AGENT_ID = 128
_MAX_POLICY_ID = 128
_MAX_DETAIL = 2000
_RULES_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPORT_FIELDS = frozenset({"sequence", "policy_id", "status", "rules_sha256", "detail"})
_STATUSES = frozenset({"applied", "failed"})
# What the fast poll takes as is: plain digits (``after``), a plain decimal (``wait``).
_AFTER = re.compile(rb"[0-9]{1,18}")
_WAIT = re.compile(rb"[0-9]{1,9}(?:\.[0-9]{1,9})?")
_JSON = b"application/json"
_SLOW_KEY = "hostiso.fast-path-declined"
# Set False on ``app.state`` to send every request to the FastAPI routes (tests compare both).
ENABLED_STATE_KEY = "agent_fast_path"


def _header(scope: Scope, name: bytes) -> bytes | None:
    # The first one, as Starlette's ``request.headers.get`` answers.
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _poll_query(query: bytes) -> tuple[int, float] | None:
    """``after`` and ``wait`` if the query is nothing but them, each at most once, plainly."""
    after: int | None = None
    wait: float | None = None
    if query:
        for part in query.split(b"&"):
            name, eq, value = part.partition(b"=")
            if not eq:
                return None
            if name == b"after" and after is None and _AFTER.fullmatch(value):
                after = int(value)
            elif name == b"wait" and wait is None and _WAIT.fullmatch(value):
                wait = float(value)
            else:
                return None
    return (after or 0), (wait or 0.0)


def _report(body: bytes) -> dict[str, Any] | None:
    """The report if ``StatusReportRequest`` would take it as it is, else None."""
    try:
        report = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(report) is not dict or not _REPORT_FIELDS.issuperset(report):
        return None
    sequence = report.get("sequence")
    policy_id = report.get("policy_id")
    rules = report.get("rules_sha256")
    detail = report.get("detail", "")
    if (
        type(sequence) is not int
        or sequence < 1
        or type(policy_id) is not str
        or not 1 <= len(policy_id) <= _MAX_POLICY_ID
        or type(report.get("status")) is not str
        or report["status"] not in _STATUSES
        or not (rules is None or (type(rules) is str and _RULES_SHA256.fullmatch(rules)))
        or type(detail) is not str
        or len(detail) > _MAX_DETAIL
    ):
        return None
    return {**report, "rules_sha256": rules, "detail": detail}


class _Replay:
    """The request's messages as received, then the channel's own (for the FastAPI route)."""

    def __init__(self, messages: list[Message], receive: Receive) -> None:
        self._messages = messages
        self._receive = receive

    async def __call__(self) -> Message:
        if self._messages:
            return self._messages.pop(0)
        return await self._receive()


class _FastRoute(Route):
    """A Starlette route with the FastAPI route's template and method, answering in front of it.

    Its ``path`` is the template, which the request metrics and spans read from the scope.
    """

    def __init__(self, path: str, method: str) -> None:
        super().__init__(path, self._answer, methods=[method], include_in_schema=False)
        self.app = self._answer  # raw ASGI: no Request, no Response object
        self.method = method

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        # Only its own method (not HEAD, not a PARTIAL): any other goes on to the FastAPI routes.
        if scope.get(_SLOW_KEY) or scope.get("method") != self.method:
            return Match.NONE, {}
        match, child = super().matches(scope)
        if match != Match.NONE:
            child["route"] = self
        return match, child

    async def to_slow(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route the request again, past the fast routes: the FastAPI route answers it."""
        scope[_SLOW_KEY] = True
        scope.pop("route", None)
        await scope["app"].router(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class PollRoute(_FastRoute):
    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope["app"]
        agent_id = scope["path_params"]["agent_id"]
        token = scope.get(AGENT_TOKEN_KEY)
        query = _poll_query(scope.get("query_string", b""))
        if (
            query is None
            or not isinstance(token, str)
            or len(agent_id) > _MAX_AGENT_ID
            or query[1] > app.state.settings.long_poll_max_s
            or not getattr(app.state, ENABLED_STATE_KEY, True)
        ):
            await self.to_slow(scope, receive, send)
            return
        after, wait = query
        try:
            held = await handlers.poll_policy(
                app.state.deps, token, agent_id, after=after, wait=wait
            )
        except UnknownAgentTokenError as exc:
            # As the FastAPI route raises it, answered by the same handler.
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail=str(exc),
                headers={"WWW-Authenticate": "Bearer"},
            ) from exc
        presence.note_poll_of(app, agent_id)
        if held is None:
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        accept = _header(scope, b"accept-encoding")
        body, coding = held.encoded_for("" if accept is None else accept.decode("latin-1"))
        headers = [
            (b"x-policy-sequence", str(held.sequence).encode()),
            (b"vary", b"Accept-Encoding"),
        ]
        if coding is not None:
            headers.append((b"content-encoding", coding.encode("latin-1")))
        headers += [(b"content-length", str(len(body)).encode()), (b"content-type", _JSON)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class ReportRoute(_FastRoute):
    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope["app"]
        agent_id = scope["path_params"]["agent_id"]
        agent = scope.get(AGENT_SCOPE_KEY)
        if (
            not isinstance(agent, AgentIdentity)
            or agent.agent_id != agent_id
            or len(agent_id) > _MAX_AGENT_ID
            or _header(scope, b"content-type") != _JSON
            or not getattr(app.state, ENABLED_STATE_KEY, True)
        ):
            await self.to_slow(scope, receive, send)
            return
        messages: list[Message] = []
        chunks: list[bytes] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # a disconnect (or the body limit's cut): the FastAPI route sees it too
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        report = _report(b"".join(chunks)) if messages[-1]["type"] == "http.request" else None
        if report is None:
            await self.to_slow(scope, _Replay(messages, receive), send)
            return
        recorded = await handlers.report_policy_status(
            app.state.deps,
            agent,
            sequence=report["sequence"],
            policy_id=report["policy_id"],
            status=report["status"],
            rules_sha256=report["rules_sha256"],
            detail=report["detail"],
        )
        app.state.metrics.status_reports.labels(recorded.status).inc()
        body = orjson.dumps(
            {
                "endpoint_id": recorded.endpoint_id,
                "sequence": recorded.sequence,
                "status": recorded.status,
            }
        )
        headers = [(b"content-length", str(len(body)).encode()), (b"content-type", _JSON)]
        await send({"type": "http.response.start", "status": 202, "headers": headers})
        await send({"type": "http.response.body", "body": body})


AGENT_SCOPE_KEY = "hostiso.agent"
AGENT_TOKEN_KEY = "hostiso.agent-token"


def install(app: FastAPI) -> None:
    """Put the fast routes in front of the FastAPI routes of the poll and the report."""
    app.router.routes[0:0] = [PollRoute(POLL_PATH, "GET"), ReportRoute(REPORT_PATH, "POST")]
