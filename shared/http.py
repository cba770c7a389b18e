"""Operational HTTP routes every service serves (``/health``, ``/ready``, ``/metrics``) and the server runner."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from starlette.routing import Match

from shared import tracing
from shared.auth import PRINCIPAL_SCOPE_KEY, TokenError, TokenPolicy, decode_token
from shared.config import ServiceSettings
from shared.problems import (
    PROBLEM_JSON,
    ProblemItem,
    document_problems,
    install_problem_handlers,
    problem_body,
)

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]


class Readiness(BaseModel):
    """Whether the service is ready, and each check (503 when one fails, as a problem)."""

    ready: bool = Field(description="True when every check passes.")
    checks: dict[str, bool] = Field(
        description="Each check by name.", examples=[{"kafka": True, "redis": True}]
    )


class ReadinessProblem(Readiness):
    """503: a check fails; RFC 9457 fields plus ``ready`` and ``checks``."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[ProblemItem]


_TEXT_METRICS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


def add_operational_routes(
    app: FastAPI, readiness: ReadinessCheck, registry: CollectorRegistry
) -> None:
    """``/health`` answers while the process lives; ``/ready`` only when every check passes.

    Also counts every request by route template and status (``hostiso_http_requests_*``) and,
    with tracing on, opens a server span per request.
    """
    app.add_middleware(RequestObservability, registry=registry)

    @app.get("/health", tags=["operations"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        tags=["operations"],
        response_model=Readiness,
        responses={503: {"model": ReadinessProblem, "description": "A check fails"}},
    )
    async def ready() -> JSONResponse:
        checks = await readiness()
        if all(checks.values()):
            return JSONResponse({"ready": True, "checks": checks})
        failing = sorted(name for name, ok in checks.items() if not ok)
        body = problem_body(
            503,
            f"not ready: {', '.join(failing)}",
            title="Not ready",
            errors=[
                ProblemItem(field=f"checks.{name}", rule="ready", message=f"{name} is not ready")
                for name in failing
            ],
            type_="about:blank",
            extensions={"ready": False, "checks": checks},
        )
        return JSONResponse(body, status_code=503, media_type=PROBLEM_JSON)

    @app.get("/metrics", tags=["operations"], response_class=Response, responses=_TEXT_METRICS)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def operation_id(route: APIRoute) -> str:
    """``read_allowlist`` -> ``readAllowlist``: the route function's name in camelCase."""
    head, *rest = route.name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def service_app(**options: Any) -> FastAPI:
    """A service's FastAPI app: problem+json errors, readable operation ids, Swagger UI
    served from a pinned package (``fastapi-offline``, no CDN), and an OpenAPI document in
    which every route lists every status it can answer (see ``shared.problems``).

    ``options`` are FastAPI's (title, description, version, lifespan).
    """
    app = FastAPIOffline(
        generate_unique_id_function=operation_id,
        static_url=DOCS_STATIC_PATH,
        favicon_url=f"{DOCS_STATIC_PATH}/favicon.png",
        **options,
    )
    install_problem_handlers(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            classify = getattr(app.state, "auth_classify", None)
            app.openapi_schema = document_problems(
                document,
                authenticated=lambda method, path: (
                    classify is not None and classify(method, path) is not None
                ),
                everywhere=getattr(app.state, "problem_responses_everywhere", {}),
                operational=OPERATIONAL_PATHS,
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# A client's arbitrary method names each get a series (as before); the cache stays bounded.
_MAX_CACHED_SERIES = 1024


class RequestObservability:
    """ASGI middleware: request counts and durations by route template, and a span per request.

    Labelled by the matched route's template (``/v1/endpoints/{endpoint_id}/isolation``), never
    the raw path, so ids do not explode the series; unmatched paths share one label.
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "hostiso_http_requests_total",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "hostiso_http_request_seconds",
            "HTTP request duration by route template and method",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._cache: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _children(self, route: str, method: str, status: int) -> tuple[Any, Any]:
        # ``.labels()`` validates and locks on every call: look each series up once. The keys
        # are bounded as the series are: route templates (or "<unmatched>"), methods, statuses.
        key = (route, method, status)
        children = self._cache.get(key)
        if children is None:
            if len(self._cache) >= _MAX_CACHED_SERIES:
                self._cache.clear()
            children = (
                self.requests.labels(route, method, str(status)),
                self.seconds.labels(route, method),
            )
            self._cache[key] = children
        return children

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not tracing.enabled():
            await self._observe(scope, receive, send, None)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        with tracing.server_span(scope["method"], scope["path"], headers) as span:
            await self._observe(scope, receive, send, span)

    async def _observe(self, scope: Scope, receive: Receive, send: Send, span: Any) -> None:
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", None) or "<unmatched>"
            method = scope["method"]
            counter, histogram = self._children(route, method, status)
            counter.inc()
            histogram.observe(time.perf_counter() - started)
            if span is not None:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)


def _http_implementation() -> str:
    """uvicorn's compiled HTTP/1.1 parser (httptools) when installed, else the pure-Python h11."""
    try:
        import httptools  # noqa: F401  (only probing that the compiled parser imports)
    except ImportError as exc:
        logging.getLogger(__name__).warning("httptools unavailable (%s): serving with h11", exc)
        return "h11"
    return "httptools"


async def serve(
    app: FastAPI,
    host: str,
    port: int,
    log_level: str = "warning",
    *,
    ssl_certfile: str | os.PathLike[str] | None = None,
    ssl_keyfile: str | os.PathLike[str] | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> None:
    """Run uvicorn in this event loop until cancelled or signalled (SIGINT/SIGTERM).

    With ``ssl_certfile`` and ``ssl_keyfile`` it serves HTTPS only (the enforcer's agent API).
    ``on_shutdown`` is called when the shutdown begins, before the requests in flight are
    waited for (the graceful timeout below), e.g. to answer long polls instead of having them
    cancelled.
    """
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ValueError("serve: ssl_certfile and ssl_keyfile go together")
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        access_log=False,
        lifespan="on",
        # The loop is whichever runs this coroutine (uvloop via
        # shared.process.install_fast_event_loop() in each service's __main__); the HTTP parser is
        # chosen here.
        http=_http_implementation(),
        # Long polls hold requests for up to a minute: on SIGTERM the enforcer answers them
        # at once (``on_shutdown``); whatever is still running after this grace is cut (uvicorn
        # answers 500 if nothing was sent yet) instead of delaying the shutdown.
        timeout_graceful_shutdown=3,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )
    server = _Server(config, on_shutdown)
    await server.serve()


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._on_shutdown is not None:
            self._on_shutdown()
        await super().shutdown(sockets)


async def with_timeout(check: Awaitable[object], timeout: float = 2.0) -> bool:
    """True if ``check`` completes without error within ``timeout`` seconds."""
    try:
        await asyncio.wait_for(check, timeout)
    except (TimeoutError, OSError, ConnectionError) as exc:
        logging.getLogger(__name__).info("readiness check failed: %s", exc)
        return False
    except Exception as exc:  # a readiness probe must answer, whatever the client raised
        logging.getLogger(__name__).warning("readiness check error: %r", exc)
        return False
    return True


# --- request guards: body size limit and the auth gate (DESIGN §4, "Errors, on every service")

MAX_BODY_BYTES = 64 * 1024
# Swagger UI's own files, from the fastapi-offline package (no CDN).
DOCS_STATIC_PATH = "/docs/static"
# Served without a token on every service: probes, metrics and the API documents.
OPERATIONAL_PATHS = frozenset(
    {"/health", "/ready", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)


async def send_problem(
    send: Send,
    status: int,
    title: str,
    detail: str,
    headers: Iterable[tuple[str, str]] = (),
    errors: Iterable[ProblemItem] = (),
) -> None:
    """Answer with an RFC 9457 problem document straight on the ASGI channel."""
    body = orjson.dumps(problem_body(status, detail, title=title, errors=errors))
    raw_headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


class BodySizeLimit:
    """Pure ASGI: 413 for a body over ``max_bytes``, decided before the application reads it.

    A declared ``Content-Length`` over the limit is refused without reading a byte; a chunked
    or under-declared body is counted while the application receives it and cut at the limit:
    the application then sees a disconnect, and its answer is dropped for the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, send: Send) -> Awaitable[None]:
        message = f"must be at most {self.max_bytes} bytes"
        return send_problem(
            send,
            413,
            "Content Too Large",
            f"request body: {message}",
            [("Connection", "close")],
            [ProblemItem(field="body", rule="max_bytes", message=message)],
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        received = 0
        cut = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, cut
            if cut:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    cut = True
                    if not started:
                        await self._too_large(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if cut:
                return  # the 413 is the answer; whatever the application says after is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not cut:
                raise
            # The application failed on its body cut short; the client already has the 413.
            logging.getLogger(__name__).debug("request body cut at %d bytes", self.max_bytes)


class AuthRefusedError(Exception):
    """An authenticator's refusal: the status (401, 403 or 503) and why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# Given the request's scope and its bearer token, raise AuthRefusedError or return (and may
# leave the identity in the scope for the route's dependency).
Authenticator = Callable[[Scope, str], Awaitable[None]]


def jwt_authenticator(policy: TokenPolicy | None) -> Authenticator:
    """Platform JWTs (partner, soc, service) checked against ``policy`` (None: refuse all)."""

    async def authenticate(scope: Scope, token: str) -> None:
        if policy is None:
            raise AuthRefusedError(401, "this service accepts no platform tokens")
        try:
            scope[PRINCIPAL_SCOPE_KEY] = decode_token(policy, token)
        except TokenError as exc:
            raise AuthRefusedError(401, str(exc)) from exc

    return authenticate


_TITLES = {401: "Unauthorized", 403: "Forbidden", 503: "Service Unavailable"}


def _routed(scope: Scope) -> bool:
    # The Starlette app puts itself in the scope before running its middleware stack.
    app = scope.get("app")
    routes = getattr(app, "routes", None)
    if routes is None:
        return True
    return any(route.matches(scope)[0] != Match.NONE for route in routes)


class AuthGate:
    """Pure ASGI: a route that needs a token answers 401 before its body is read or parsed.

    ``classify(method, path)`` names the authenticator of a request, or None for a public
    route. A path no route serves passes through to its 404 (which reads no body).
    """

    def __init__(self, app: ASGIApp, classify: Callable[[str, str], Authenticator | None]) -> None:
        self.app = app
        self.classify = classify

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        authenticate = self.classify(scope["method"], scope["path"])
        if authenticate is None or not _routed(scope):
            await self.app(scope, receive, send)
            return
        raw = (_header(scope, b"authorization") or b"").decode("latin-1")
        scheme, _, token = raw.partition(" ")
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthRefusedError(401, "missing bearer token (Authorization: Bearer <token>)")
            await authenticate(scope, token.strip())
        except AuthRefusedError as refusal:
            headers = [("WWW-Authenticate", "Bearer")] if refusal.status == 401 else []
            if refusal.status == 503:
                headers.append(("Retry-After", "1"))
            title = _TITLES.get(refusal.status, "Refused")
            rule = {401: "bearer_token", 403: "token_scope"}.get(refusal.status)
            errors = (
                [ProblemItem(field="header.Authorization", rule=rule, message=refusal.detail)]
                if rule
                else []
            )
            await send_problem(send, refusal.status, title, refusal.detail, headers, errors)
            return
        await self.app(scope, receive, send)


def install_request_guards(
    app: FastAPI,
    *,
    token_policy: TokenPolicy | None,
    public_paths: Iterable[str] = (),
    public_prefixes: Iterable[str] = (),
    public_routes: Iterable[tuple[str, str]] = (),
    other_authenticators: Iterable[tuple[re.Pattern[str], Authenticator]] = (),
    max_body_bytes: int = MAX_BODY_BYTES,
) -> None:
    """The body limit and the auth gate of one service.

    Call it before adding other middleware (CORS, observability): Starlette runs the last added
    outermost, so CORS headers and request metrics also cover the 401s and 413s.
    ``other_authenticators`` (path pattern, authenticator) take precedence over the JWT one,
    e.g. the enforcer's agent-token routes; ``public_routes`` are (method, path) pairs.
    """
    app.state.token_policy = token_policy
    platform = jwt_authenticator(token_policy)
    paths = OPERATIONAL_PATHS | frozenset(public_paths)
    prefixes = (f"{DOCS_STATIC_PATH}/", *public_prefixes)
    routes = frozenset(public_routes)
    others = tuple(other_authenticators)

    def classify(method: str, path: str) -> Authenticator | None:
        if path in paths or (method, path) in routes or path.startswith(prefixes):
            return None
        for pattern, authenticator in others:
            if pattern.match(path):
                return authenticator
        return platform

    app.state.auth_classify = classify  # the OpenAPI document lists 401/403 where it applies
    app.add_middleware(AuthGate, classify=classify)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)


def token_policy(settings: ServiceSettings, audience: str) -> TokenPolicy:
    """The service's token rules from ``HOSTISO_JWT_*`` (a ConfigError without a secret)."""
    return TokenPolicy(
        secret=settings.require_secret("jwt_secret"),
        audience=audience,
        max_lifetime_s=settings.jwt_max_lifetime_s,
        service_max_lifetime_s=settings.jwt_service_max_lifetime_s,
    )
